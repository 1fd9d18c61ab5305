"""The one train loop every recipe uses.

A recipe hands over `step_fn(state, batch, key) -> (state, metrics)` (a jitted pure function,
or a host function that chains jitted pieces, as RL with host-side rewards does), the initial
(already sharded) state and, for supervised work, a host batch iterator. The loop
owns everything around it: resume from the newest checkpoint, per-step keys, logging,
evaluation cadence, checkpoints, SIGTERM (preemption) and the NaN/Inf guard.

Exact resume: step t always uses `fold_in(key, t)`, and the data iterator's state is saved
with the train state, so an interrupted run continues with the same keys and batches.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxrl.core import metrics as metrics_lib
from jaxrl.core.checkpoint import Checkpointer
from jaxrl.core.config import RecipeConfig, to_dict
from jaxrl.core.mesh import shard_batch


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was saved. `jaxrl.launch` exits 0 on this."""


class NonFiniteError(Exception):
    """A metric went NaN/Inf; training stopped before the bad state reached a checkpoint."""


@dataclass
class LoopResult:
    state: Any
    step: int
    last_metrics: dict
    eval_metrics: dict


def train(
    cfg: RecipeConfig,
    *,
    state,
    step_fn: Callable,
    key: jax.Array,
    batches: Iterator | None = None,
    eval_fn: Callable[[Any, int], dict] | None = None,
    mesh=None,
    tokens_per_step: int = 0,
) -> LoopResult:
    """Run `cfg.loop.steps` steps of `step_fn`, resuming from `cfg.run.dir` if it holds a checkpoint.

    `batches` yields host-local numpy pytrees; with `mesh` they are placed on it. If the
    iterator has `get_state`/`set_state` (Grain iterators do), its position is checkpointed.
    `eval_fn(state, step)` returns host metrics; it runs every `loop.eval_every` steps and at
    the end.
    """
    loop = cfg.loop
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(run_dir / "checkpoints", keep=loop.keep_checkpoints)
    writer = metrics_lib.MetricsWriter(run_dir, wandb_mode=cfg.run.wandb,
                                       wandb_project=cfg.run.wandb_project, config=to_dict(cfg))
    step = 0
    if ckpt.latest_step() is not None:
        state, data_state, meta = ckpt.restore(state)
        step = int(meta["step"])
        if data_state and batches is not None and hasattr(batches, "set_state"):
            batches.set_state(data_state)
        _log(f"resumed from {ckpt.directory} at step {step}")
    writer.truncate_after(step)  # also drops rows of a run killed before its first checkpoint

    def save(at_step: int):
        if not _all_finite(state):
            raise NonFiniteError(_nonfinite_message(at_step, {"params": "NaN/Inf"}, ckpt))
        data_state = batches.get_state() if hasattr(batches, "get_state") else None
        ckpt.save(at_step, state, data=data_state, meta={"step": at_step})

    pending: list[tuple[int, dict]] = []
    last: dict = {}
    evals: dict = {}
    evaluated_at = -1
    bar = _progress(loop.progress, loop.steps, step)
    clock = time.perf_counter()
    clock_step = step

    def flush():
        """Bring pending step metrics to the host, check them, write their mean."""
        nonlocal last, clock, clock_step
        if not pending:
            return
        host = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, host):
            bad = {k: v for k, v in m.items() if not np.all(np.isfinite(v))}
            if bad:
                pending.clear()
                raise NonFiniteError(_nonfinite_message(s, bad, ckpt))
        last = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
        now = time.perf_counter()
        rate = (step - clock_step) / max(now - clock, 1e-9)
        last["steps_per_sec"] = rate
        if tokens_per_step:
            last["tokens_per_sec"] = rate * tokens_per_step
        clock, clock_step = now, step
        writer.write(step, last)
        if bar is not None:
            shown = sorted(last, key=lambda k: not any(w in k for w in metrics_lib.MAIN_CURVES))
            shown = shown[:3] + [k for k in ("tokens_per_sec",) if k in last]
            bar.set_postfix({k: f"{last[k]:.4g}" for k in shown}, refresh=False)
        pending.clear()

    with _sigterm_flag() as preempted:
        try:
            while step < loop.steps:
                batch = next(batches) if batches is not None else None
                if batch is not None and mesh is not None:
                    batch = shard_batch(batch, mesh)
                state, step_metrics = step_fn(state, batch, jax.random.fold_in(key, step))
                step += 1
                pending.append((step, step_metrics))
                if bar is not None:
                    bar.update(1)
                at_end = step == loop.steps
                if at_end or (loop.log_every and step % loop.log_every == 0):
                    flush()
                if eval_fn is not None and loop.eval_every and step % loop.eval_every == 0:
                    evals, evaluated_at = eval_fn(state, step), step
                    writer.write(step, evals)
                if loop.checkpoint_every and step % loop.checkpoint_every == 0 and not at_end:
                    flush()
                    save(step)
                if _any_process(preempted[0], step, loop.log_every):
                    flush()
                    if ckpt.latest_step() != step:
                        save(step)
                    ckpt.wait()
                    raise Preempted(f"SIGTERM: saved step {step} to {ckpt.directory}; "
                                    "re-run the same command to resume.")
            flush()
            if eval_fn is not None and evaluated_at != step:
                evals = eval_fn(state, step)
                writer.write(step, evals)
            if ckpt.latest_step() != step:
                save(step)
            ckpt.wait()
        finally:
            if bar is not None:
                bar.close()
            ckpt.wait()
            ckpt.close()
            writer.close()
    if jax.process_index() == 0 and writer.path.exists():
        metrics_lib.plot_metrics(writer.path, run_dir / "metrics.png")
    return LoopResult(state=state, step=step, last_metrics=last, eval_metrics=evals)


def _all_finite(tree) -> bool:
    leaves = [x for x in jax.tree.leaves(tree)
              if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(_finite(leaves)) if leaves else True


@jax.jit
def _finite(leaves):
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def _nonfinite_message(step: int, bad: dict, ckpt: Checkpointer) -> str:
    good = ckpt.latest_step()
    kept = (f"the last good checkpoint (step {good}) in {ckpt.directory} is kept"
            if good is not None else "no checkpoint was written")
    return (f"non-finite values at step {step}: {', '.join(f'{k}={v}' for k, v in bad.items())}. "
            f"Training stopped; {kept}. Lower the learning rate, enable gradient clipping or "
            "check the data, then re-run the same command to resume from the last good step.")


@contextlib.contextmanager
def _sigterm_flag():
    """Yields a one-element list that becomes [True] when SIGTERM arrives."""
    flag = [False]

    def handler(signum, frame):
        flag[0] = True

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no preemption handling
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _any_process(flag: bool, step: int, every: int) -> bool:
    """Single process: check every step. Multi-host: agree at log boundaries (one allgather)."""
    if jax.process_count() == 1:
        return flag
    if every and step % every:
        return False
    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def _progress(enabled: bool, total: int, initial: int):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", mininterval=2.0, dynamic_ncols=True)


def _log(msg: str):
    if jax.process_index() == 0:
        print(f"[jaxrl] {msg}", flush=True)
