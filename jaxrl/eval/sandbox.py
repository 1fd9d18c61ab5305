"""Run untrusted programs (model-written code, RTL simulations) without trusting them.

`Sandbox("bwrap")` is the default and the only mode that isolates: bubblewrap gives the program a
read-only view of the root, a fresh size-capped tmpfs (or a given scratch dir) as its only
writable place, no network, its own PID namespace (everything it spawns dies with it) and
`--die-with-parent`; the user's home directories are hidden. On top come rlimits (CPU seconds,
address space, file size, open files, no core dumps), a process cap (a pids cgroup where the host
lets us create one, else `RLIMIT_NPROC` for non-root users), a wall-clock timeout that kills the
whole process group, and a cap on captured output.

`Sandbox("process")` is a weaker fallback for hosts without bwrap that must be asked for by name:
the same limits and a new session, but no namespaces, so the program can read and write anything
the user can. It says so once on stderr and in `Sandbox.describe()`.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

MODES = ("bwrap", "process")

_BWRAP_INSTALL_HINT = (
    "bubblewrap (`bwrap`) is not installed, so untrusted code cannot be sandboxed. Install it with "
    "`sudo apt-get install -y bubblewrap` (Debian/Ubuntu) or `dnf install bubblewrap`, or - only if "
    "you accept running model-written code with your user's rights - pass mode='process' "
    "(config: sandbox=process)."
)


class SandboxUnavailable(RuntimeError):
    """The requested sandbox mode cannot run on this host."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits for one sandboxed run."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 2 << 30  # address space; Python needs ~50 MB, vvp+cocotb ~1 GB of mappings
    file_size_bytes: int = 64 << 20
    tmpfs_bytes: int = 128 << 20  # size of the fresh tmpfs work dir
    max_processes: int = 64
    max_open_files: int = 256
    output_bytes: int = 1 << 20  # stdout+stderr kept; more kills the run

    def replace(self, **changes) -> "Limits":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class RunResult:
    returncode: int | None  # negative = killed by that signal (subprocess convention)
    output: str  # stdout and stderr interleaved, at most Limits.output_bytes
    wall_seconds: float
    timed_out: bool = False
    output_truncated: bool = False

    @property
    def failure(self) -> str | None:
        """Why the run did not end normally, in words; None if it exited on its own."""
        if self.timed_out:
            return f"timed out after {self.wall_seconds:.1f}s wall clock"
        if self.output_truncated:
            return "output limit exceeded (run killed)"
        if self.returncode is not None and self.returncode < 0:
            sig = signal.Signals(-self.returncode)
            what = {
                signal.SIGXCPU: "CPU time limit exceeded",
                signal.SIGSEGV: "crashed with a segmentation fault",
                signal.SIGXFSZ: "file size limit exceeded",
                signal.SIGKILL: "killed (SIGKILL: CPU or memory limit)",
            }.get(sig, f"killed by {sig.name}")
            return f"{what} ({sig.name})"
        return None


_run_ids = itertools.count()
_warned_process_mode = threading.Event()


def _pids_cgroup_root() -> Path | None:
    """A cgroup-v1/v2 directory where we may create per-run pids cgroups, or None."""
    for root in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        if (root / "cgroup.procs").exists() and os.access(root, os.W_OK):
            probe = root / f"jaxrl-probe-{os.getpid()}"
            try:
                probe.mkdir()
                ok = (probe / "pids.max").exists()
                probe.rmdir()
            except OSError:
                continue
            if ok:
                return root
    return None


class Sandbox:
    """Runs argv under limits; see the module docstring for what each mode guarantees."""

    def __init__(self, mode: str = "bwrap", limits: Limits = Limits()):
        if mode not in MODES:
            raise ValueError(f"unknown sandbox mode {mode!r}; choose one of {MODES}")
        self.mode = mode
        self.limits = limits
        self._bwrap = shutil.which("bwrap")
        self._prlimit = shutil.which("prlimit")
        if self._prlimit is None:
            raise SandboxUnavailable(
                "`prlimit` (util-linux) is not installed; it applies the CPU/memory/file limits. "
                "Install it with `sudo apt-get install -y util-linux`."
            )
        if mode == "bwrap":
            if self._bwrap is None:
                raise SandboxUnavailable(_BWRAP_INSTALL_HINT)
            self._check_bwrap_runs()
        elif not _warned_process_mode.is_set():
            _warned_process_mode.set()
            print(f"WARNING: {self.describe()}", file=sys.stderr)
        self._cgroup_root = _pids_cgroup_root()
        self._local = threading.local()

    def describe(self) -> str:
        if self.mode == "bwrap":
            return "bwrap sandbox: read-only root, private tmpfs, no network, own PID namespace"
        return (
            "process mode (NOT a sandbox): rlimits + new session only; the program can read and "
            "write your files and use the network"
        )

    def _check_bwrap_runs(self) -> None:
        probe = subprocess.run(
            [self._bwrap, "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "true"],
            capture_output=True,
            text=True,
        )
        if probe.returncode != 0:
            raise SandboxUnavailable(
                f"bwrap is installed but cannot create namespaces here: {probe.stderr.strip()}. "
                "Enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1) "
                "or run where they are allowed; mode='process' is the unsafe fallback."
            )

    # -- command construction ------------------------------------------------------------------

    def _bwrap_argv(self, argv: Sequence[str], limits: Limits, workdir: str | None) -> list[str]:
        args = [self._bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        args += ["--size", str(limits.tmpfs_bytes), "--tmpfs", "/tmp"]
        # Hide home directories (and the host's /tmp, replaced above), then re-expose read-only
        # only what the interpreter and our harness scripts need: a checkout or virtualenv may
        # live under either.
        homes = sorted(h for h in {str(Path.home()), "/root", "/home"} if os.path.isdir(h))
        for home in homes:
            args += ["--tmpfs", home]
        needed = {sys.prefix, sys.base_prefix, str(Path(sys.executable).resolve().parent.parent),
                  str(Path(__file__).resolve().parent)}
        for path in sorted(needed):
            hidden = any(path.startswith(root.rstrip("/") + "/") for root in ["/tmp", *homes])
            if hidden and os.path.isdir(path):
                args += ["--ro-bind", path, path]
        if workdir is not None:
            args += ["--bind", workdir, workdir, "--chdir", workdir]
        else:
            args += ["--chdir", "/tmp"]
        # An unprivileged uid inside: no capabilities, so file permissions bind even when we are root.
        args += ["--unshare-all", "--uid", "1000", "--gid", "1000"]
        args += ["--die-with-parent", "--new-session", "--", *argv]
        return args

    def _limit_argv(self, limits: Limits, use_nproc: bool) -> list[str]:
        args = [
            self._prlimit,
            f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}",  # SIGXCPU first, SIGKILL 1 s later
            f"--as={limits.memory_bytes}",
            f"--fsize={limits.file_size_bytes}",
            f"--nofile={limits.max_open_files}",
            "--core=0",
        ]
        if use_nproc:
            args.append(f"--nproc={limits.max_processes + _user_process_count()}")
        return [*args, "--"]

    # -- running -------------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes = b"",
        limits: Limits | None = None,
        workdir: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
    ) -> RunResult:
        """Run argv to completion or to a limit. `workdir` (a host dir) replaces the tmpfs."""
        limits = limits or self.limits
        workdir = None if workdir is None else str(Path(workdir).resolve())
        cgroup = self._make_cgroup(limits)
        # Root ignores RLIMIT_NPROC; use it only where it binds and no cgroup caps processes.
        use_nproc = cgroup is None and os.getuid() != 0
        inner = (
            self._bwrap_argv(argv, limits, workdir) if self.mode == "bwrap" else list(argv)
        )
        full = self._limit_argv(limits, use_nproc) + inner
        if cgroup is not None:
            full = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *full]
        child_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
            **(env or {}),
        }
        own_dir = None
        if self.mode == "process" and workdir is None:  # no tmpfs here: use a fresh scratch dir
            own_dir = scratch_dir()
            workdir = own_dir.name
        start = time.monotonic()
        proc = subprocess.Popen(
            full,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=workdir or tempfile.gettempdir(),
            env=child_env,
            start_new_session=True,
        )
        try:
            result = self._communicate(proc, stdin, limits, start)
        finally:
            _kill_group(proc)
            if cgroup is not None:
                _empty_cgroup(cgroup)
            if own_dir is not None:
                own_dir.cleanup()
        return result

    def _communicate(self, proc, stdin: bytes, limits: Limits, start: float) -> RunResult:
        if len(stdin) <= 32768:  # fits the pipe buffer: no writer thread needed
            _feed(proc.stdin, stdin)
        else:
            threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True).start()
        chunks, size = [], 0
        timed_out = truncated = False
        deadline = start + limits.wall_seconds
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                if not sel.select(timeout=min(remaining, 0.5)):
                    continue
                data = os.read(proc.stdout.fileno(), 65536)
                if not data:  # EOF: every holder of the pipe has exited
                    break
                chunks.append(data)
                size += len(data)
                if size > limits.output_bytes:
                    truncated = True
                    break
        if timed_out or truncated:
            _kill_group(proc)
        try:
            returncode = proc.wait(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        except subprocess.TimeoutExpired:  # closed its output but kept running
            timed_out = True
            _kill_group(proc)
            returncode = proc.wait()
        proc.stdout.close()
        if self.mode == "bwrap" and 128 < returncode <= 128 + 64:  # bwrap reports signals as 128+n
            returncode = 128 - returncode
        output = b"".join(chunks)[: limits.output_bytes].decode("utf-8", "replace")
        return RunResult(
            returncode=returncode,
            output=output,
            wall_seconds=time.monotonic() - start,
            timed_out=timed_out,
            output_truncated=truncated,
        )

    def _make_cgroup(self, limits: Limits) -> Path | None:
        """This thread's pids cgroup (created once, reused run after run), or None."""
        if self._cgroup_root is None:
            return None
        path = getattr(self._local, "cgroup", None)
        try:
            if path is None:
                path = self._cgroup_root / f"jaxrl-sandbox-{os.getpid()}-{next(_run_ids)}"
                path.mkdir()
                _cgroups_to_remove.append(path)
                self._local.cgroup = path
            (path / "pids.max").write_text(str(limits.max_processes))
        except OSError:
            return None
        return path


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except (BrokenPipeError, OSError):
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _empty_cgroup(path: Path) -> None:
    """Kill whatever is left in the cgroup, including processes that escaped our session."""
    for _ in range(200):
        try:
            pids = (path / "cgroup.procs").read_text().split()
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.005)


_cgroups_to_remove: list[Path] = []


@atexit.register
def _remove_cgroups() -> None:
    for path in _cgroups_to_remove:
        _empty_cgroup(path)
        try:
            path.rmdir()
        except OSError:
            pass


def _user_process_count() -> int:
    uid = os.getuid()
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


def scratch_dir(prefix: str = "jaxrl-sandbox-") -> tempfile.TemporaryDirectory:
    """A host scratch dir for runs that must exchange files with the sandbox (RAM-backed if possible)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.TemporaryDirectory(prefix=prefix, dir=base)
