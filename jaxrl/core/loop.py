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

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl.core import metrics as metrics_lib
from jaxrl.core.checkpoint import Checkpointer, require_shared
from jaxrl.core.config import RecipeConfig, to_dict
from jaxrl.core.mesh import shard_batch
from jaxrl.core.preemption import PreemptionWatch
from jaxrl.core.step import CompiledStep, ShardedInit


class Preempted(Exception):
    """SIGTERM / SIGHUP / a peer's preemption notice; a checkpoint was saved. `jaxrl.launch`
    exits 0 on this."""


class NonFiniteError(Exception):
    """A metric went NaN/Inf; training stopped before the bad state reached a checkpoint."""


@dataclass
class LoopResult:
    state: Any
    step: int
    last_metrics: dict
    eval_metrics: dict
    trained_steps: int = 0  # steps this invocation ran (0: the checkpoint was already done)
    # seconds: compile_s, eval_s, checkpoint_s, and step_s: the stepping that steps/s counts
    timers: dict = field(default_factory=dict)
    timed_steps: int = 0  # the steps step_s covers (all but the compiling call's)


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
    """Run `cfg.loop.steps` steps of `step_fn`, resuming from the newest checkpoint if any.

    Args:
      state: a `core.step.ShardedInit` (a resumed run restores straight into its abstract
        layout, so no second copy of the state is ever built), or a ready state.
      step_fn: `(state, batch, key) -> (state, metrics)`, usually from `core.step.compile_step`.
        Without batches, such a step runs up to `loop.max_fused_steps` steps per call (never
        past a log / eval / checkpoint point), with the same per-step keys.
      batches: host-local numpy pytrees; with `mesh` they are placed on it. A Grain iterator's
        position is checkpointed (per process) and restored.
      eval_fn: `(state, step) -> host metrics`, every `loop.eval_every` steps and at the end;
        never called on a state the NaN guard would reject.

    Steps/s counts stepping only: the first (compiling) step, evaluations and checkpoint
    writes are timed and logged apart (`time/compile_s`, `time/eval_s`, `time/checkpoint_s`).
    The result's `timers["step_s"]` and `timed_steps` are the same clock over the whole run,
    so creating the state, restoring it and plotting never count as stepping.
    """
    loop = cfg.loop
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    require_shared(checkpoint_dir(cfg))
    ckpt = Checkpointer(checkpoint_dir(cfg), keep=loop.keep_checkpoints)
    writer = metrics_lib.MetricsWriter(run_dir, wandb_mode=cfg.run.wandb,
                                       wandb_project=cfg.run.wandb_project, config=to_dict(cfg))
    step = 0
    data = batches if hasattr(batches, "get_state") else None
    if ckpt.latest_step() is not None:
        template = state.abstract if isinstance(state, ShardedInit) else state
        state, _, meta = ckpt.restore(template, data=data)
        step = int(meta["step"])
        _log(f"resumed from {ckpt.directory} at step {step}")
    elif isinstance(state, ShardedInit):
        state = state()
    writer.truncate_after(step)  # also drops rows of a run killed before its first checkpoint
    start_step = step
    if step >= loop.steps:
        _log(f"nothing left to train: the checkpoint is at step {step} and loop.steps="
             f"{loop.steps}; raise loop.steps to train longer (evaluating only).")
    saved = [ckpt.latest_step()]
    timers = {"compile_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0, "step_s": 0.0}
    timed_steps = 0

    def save(at_step: int):
        began = time.perf_counter()  # the finiteness check (and its compile) is not stepping
        if not _all_finite(state):
            raise NonFiniteError(_nonfinite_message(at_step, {"params": "NaN/Inf"}, ckpt))
        ckpt.save(at_step, state, data=data, meta={"step": at_step})
        timers["checkpoint_s"] += time.perf_counter() - began
        saved[0] = at_step

    def run_eval(at_step: int) -> dict:
        flush()  # metrics first: a NaN loss stops here, before eval sees the state
        began = time.perf_counter()
        if not _all_finite(state):
            raise NonFiniteError(_nonfinite_message(at_step, {"params": "NaN/Inf"}, ckpt))
        out = eval_fn(state, at_step)
        timers["eval_s"] += time.perf_counter() - began
        writer.write(at_step, {**out, "time/eval_s": time.perf_counter() - began})
        return out

    pending: list[tuple[int, int, dict]] = []  # (step after the call, steps in it, metrics)
    fuse = batches is None and loop.max_fused_steps > 1 and isinstance(step_fn, CompiledStep)
    fused_length = min(loop.max_fused_steps, loop.steps)  # one compiled program for every count
    last: dict = {}
    evals: dict = {}
    evaluated_at = -1
    bar = _progress(loop.progress, loop.steps, step)
    # Where steps/s was last measured from: time, step, pause totals then.
    clock = {"t": time.perf_counter(), "step": step, "paused": 0.0, "checkpoint_s": 0.0,
             "compile_logged": False}

    def flush():
        """Bring pending step metrics to the host, check them, write their mean."""
        nonlocal last, timed_steps
        if not pending:
            return
        host = []  # (step, metrics) per step; a fused call's metrics are stacked over its steps
        for (end, count), m in zip([p[:2] for p in pending], jax.device_get([p[2] for p in pending])):
            host += [(end, m)] if not fuse else [
                (end - count + 1 + i, {k: v[i] for k, v in m.items()}) for i in range(count)]
        for s, m in host:
            bad = {k: v for k, v in m.items() if not np.all(np.isfinite(v))}
            if bad:
                pending.clear()
                raise NonFiniteError(_nonfinite_message(s, bad, ckpt))
        host = [m for _, m in host]
        last = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
        now = time.perf_counter()
        paused = timers["eval_s"] + timers["checkpoint_s"]  # cumulative, excluded from steps/s
        seconds = now - clock["t"] - (paused - clock["paused"])
        rate = (step - clock["step"]) / max(seconds, 1e-9)
        if step > clock["step"]:
            last["steps_per_sec"] = rate
            timers["step_s"] += seconds
            timed_steps += step - clock["step"]
            if tokens_per_step:
                last["tokens_per_sec"] = rate * tokens_per_step
        row = dict(last)
        if timers["compile_s"] and not clock["compile_logged"]:
            row["time/compile_s"] = timers["compile_s"]
            clock["compile_logged"] = True
        if timers["checkpoint_s"] > clock["checkpoint_s"]:
            row["time/checkpoint_s"] = timers["checkpoint_s"] - clock["checkpoint_s"]
        clock.update(t=now, step=step, paused=paused, checkpoint_s=timers["checkpoint_s"])
        writer.write(step, row)
        if bar is not None:
            shown = sorted(last, key=lambda k: not any(w in k for w in metrics_lib.MAIN_CURVES))
            shown = shown[:3] + [k for k in ("tokens_per_sec",) if k in last]
            bar.set_postfix({k: f"{last[k]:.4g}" for k in shown}, refresh=False)
        pending.clear()

    stuck_note = lambda: (f"The last complete checkpoint (step {saved[0]}) in {ckpt.directory} "  # noqa: E731
                          "is kept." if saved[0] is not None else "No checkpoint was written yet.")
    with PreemptionWatch(cfg.run.preemption_grace_s, stuck_note) as watch:
        try:
            calls = 0
            while step < loop.steps:
                began = time.perf_counter()
                count = _fused_count(step, loop) if fuse else 1
                if fuse:
                    state, step_metrics = step_fn.steps(state, key, step, count, fused_length)
                else:
                    batch = next(batches) if batches is not None else None
                    if batch is not None and mesh is not None:
                        batch = shard_batch(batch, mesh)
                    state, step_metrics = step_fn(state, batch, jax.random.fold_in(key, step))
                step += count
                calls += 1
                if calls == 1:  # the compiling call: timed alone, not in steps/s
                    jax.block_until_ready(step_metrics)
                    timers["compile_s"] = time.perf_counter() - began
                    clock.update(t=time.perf_counter(), step=step,
                                 paused=timers["eval_s"] + timers["checkpoint_s"])
                pending.append((step, count, step_metrics))
                if bar is not None:
                    bar.update(count)
                at_end = step == loop.steps
                if at_end or (loop.log_every and step % loop.log_every == 0):
                    flush()
                if eval_fn is not None and loop.eval_every and step % loop.eval_every == 0:
                    evals, evaluated_at = run_eval(step), step
                if loop.checkpoint_every and step % loop.checkpoint_every == 0 and not at_end:
                    flush()
                    save(step)
                if watch.requested(calls):  # every process makes the same calls
                    flush()
                    if saved[0] != step:
                        save(step)
                    ckpt.wait()
                    name = watch.signal_name or "preemption notice"
                    raise Preempted(f"{name}: saved step {step} to {ckpt.directory}; "
                                    "re-run the same command to resume.")
            flush()
            if eval_fn is not None and evaluated_at != step:
                evals = run_eval(step)
            if saved[0] != step:
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
    return LoopResult(state=state, step=step, last_metrics=last, eval_metrics=evals,
                      trained_steps=step - start_step, timers=timers, timed_steps=timed_steps)


def _fused_count(step: int, loop) -> int:
    """Steps until the next log / eval / checkpoint point or the end, at most max_fused_steps."""
    ends = [loop.steps, step + loop.max_fused_steps]
    ends += [(step // every + 1) * every
             for every in (loop.log_every, loop.eval_every, loop.checkpoint_every) if every]
    return min(ends) - step


def checkpoint_dir(cfg: RecipeConfig) -> str:
    """`run.checkpoint_dir`, or `<run.dir>/checkpoints` when it is empty."""
    return cfg.run.checkpoint_dir or str(Path(cfg.run.dir) / "checkpoints")


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


def _progress(enabled: bool, total: int, initial: int):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", mininterval=2.0, dynamic_ncols=True)


def _log(msg: str):
    if jax.process_index() == 0:
        print(f"[jaxrl] {msg}", flush=True)
