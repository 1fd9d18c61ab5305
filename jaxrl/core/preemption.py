"""Preemption: SIGTERM / SIGHUP become a save at the next step, and a stuck process still ends.

One process: a Python handler sets a flag the loop reads after every step. Several processes:
JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`, called every
step) makes every host stop at the same step, within a step of the notice on any one host.
JAX's notifier is a C handler for SIGTERM installed by `jax.distributed.initialize`; the
Python handler installed here replaces it, so the watchdog thread forwards each notice to it.

The watchdog: Python runs signal handlers only between bytecodes of the main thread, so a
process blocked in a collective with a dead or stopped peer, or in a wedged save, would never
act on SIGTERM. The C-level part of Python's handler also writes the signal number to a
wakeup fd; a thread reading it starts a grace timer and, if the process has not exited when it
runs out, prints why and ends the process (`os._exit`). Orbax's atomic commit keeps the last
finished checkpoint intact either way.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable

import jax
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGHUP)
EXIT_STUCK = 75  # EX_TEMPFAIL: nothing was lost, re-run to resume


class PreemptionWatch:
    """Context manager: `requested(call)` is True after the loop call (one step, or several fused)
    at which every process saves and stops; processes number their calls alike."""

    def __init__(self, grace_s: float, on_stuck: Callable[[], str] = lambda: ""):
        self.grace_s = grace_s
        self.on_stuck = on_stuck  # -> extra text for the stuck message (the last good step)
        self.flag = False
        self.signal_name = ""
        self._installed: dict[int, object] = {}
        self._done = threading.Event()
        self._fds: tuple[int, int] | None = None
        self._old_wakeup = -1
        self._jax_notifier = None

    # -- the loop's view
    def requested(self, call: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(call)
        return self.flag

    # -- installation
    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signals go to the main thread only: no preemption handling here
        if jax.process_count() > 1:
            self._jax_notifier = _c_handler(signal.SIGTERM)
        for sig in SIGNALS:
            self._installed[sig] = signal.signal(sig, self._handle)
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._fds = (r, w)
        self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="jaxrl-preemption-watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        if self._fds is None:
            return False
        signal.set_wakeup_fd(self._old_wakeup)
        for sig, previous in self._installed.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        if self._jax_notifier is not None:
            _restore_c_handler(signal.SIGTERM, self._jax_notifier)
        os.write(self._fds[1], b"\0")  # wake the watchdog so it can exit
        return False

    def _handle(self, signum, frame):
        self.flag = True
        self.signal_name = signal.Signals(signum).name

    def _watch(self):
        r, _ = self._fds
        while not self._done.is_set():
            data = os.read(r, 64)
            signums = [b for b in data if b in SIGNALS]
            if not signums or self._done.is_set():
                continue
            if self._jax_notifier is not None:
                self._jax_notifier(signal.SIGTERM)  # tell the other hosts (SIGHUP too)
            if self._done.wait(self.grace_s):
                return
            name = signal.Signals(signums[0]).name
            sys.stderr.write(
                f"[jaxrl] {name} received {self.grace_s:g} s ago and no step boundary was reached "
                "(stuck in a collective with a dead or stopped peer, or in a save); exiting "
                f"without a new checkpoint. {self.on_stuck()} Re-run the same command to "
                "resume; raise run.preemption_grace_s if saves legitimately take longer.\n")
            sys.stderr.flush()
            os._exit(EXIT_STUCK)


# JAX's SIGTERM notifier is a C function pointer, invisible to `signal.getsignal`. Read it with
# sigaction(2), call it from the watchdog thread (it only sets an atomic flag), and put it back
# on exit. glibc's x86-64/aarch64 `struct sigaction`: handler, 128-byte mask, flags, restorer.
class _SigAction(ctypes.Structure):
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ubyte * 128),
                ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p)]


_SA_SIGINFO = 4
_libc = None


def _sigaction(sig: int, new: _SigAction | None) -> _SigAction:
    global _libc
    _libc = _libc or ctypes.CDLL(None, use_errno=True)
    old = _SigAction()
    if _libc.sigaction(sig, ctypes.byref(new) if new is not None else None, ctypes.byref(old)):
        raise OSError(ctypes.get_errno(), "sigaction failed")
    return old


class _CHandler:
    def __init__(self, action: _SigAction):
        self.action = action
        if action.flags & _SA_SIGINFO:
            fn = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(action.handler)
            self._call = lambda sig: fn(sig, None, None)
        else:
            fn = ctypes.CFUNCTYPE(None, ctypes.c_int)(action.handler)
            self._call = fn

    def __call__(self, sig: int):
        self._call(sig)


def _c_handler(sig: int) -> _CHandler | None:
    """The C handler installed for `sig` (JAX's notifier), or None if it is SIG_DFL/SIG_IGN."""
    try:
        action = _sigaction(sig, None)
    except (OSError, AttributeError):
        return None
    return _CHandler(action) if action.handler not in (None, 0, 1) else None


def _restore_c_handler(sig: int, handler: _CHandler):
    _sigaction(sig, handler.action)
