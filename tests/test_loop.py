"""The shared train loop: NaN guard, crash-safe checkpoints, SIGTERM on a checkpoint step.

Resume after SIGTERM is tested on two processes with real SFT and data (equal to an
uninterrupted run) in tests/test_multihost.py, and bitwise in-process (SIGHUP, same handler)
in tests/test_platform.py."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO
from jaxrl.core.checkpoint import Checkpointer
from jaxrl.core.config import LoopConfig, RecipeConfig, RunConfig
from jaxrl.core.loop import NonFiniteError, train
from jaxrl.core.metrics import read_jsonl


def _params(run_dir: Path):
    """Final params of a run, read back from its newest checkpoint as numpy."""
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    step = ckpt.latest_step()
    tree = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    ckpt.close()
    return step, tree["params"]


def _toy_cfg(tmp_path, steps, checkpoint_every=0):
    return RecipeConfig(run=RunConfig(dir=str(tmp_path)),
                        loop=LoopConfig(steps=steps, log_every=1, checkpoint_every=checkpoint_every,
                                        progress=False))


def _toy_step(state, batch, key):
    """Gradient descent on w toward 1; the learning rate turns the step to NaN at step 6."""
    w = state["w"] - 0.1 * (state["w"] - 1.0)
    w = jnp.where(state["step"] >= 5, w * jnp.nan, w)
    return {"w": w, "step": state["step"] + 1}, {"loss": jnp.sum((w - 1.0) ** 2)}


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    state = {"w": jnp.zeros(4), "step": jnp.int32(0)}
    with pytest.raises(NonFiniteError) as err:
        train(_toy_cfg(tmp_path, steps=10, checkpoint_every=2), state=state,
              step_fn=jax.jit(_toy_step), key=jax.random.key(0))
    message = str(err.value)
    assert "non-finite values at step 6" in message and "loss=nan" in message
    assert "last good checkpoint (step 4)" in message and "re-run" in message
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert list(ckpt.manager.all_steps()) == [2, 4]
    restored, _, meta = ckpt.restore(state)
    assert meta["step"] == 4 and np.all(np.isfinite(restored["w"]))
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # nothing past the last good step


def _nan_weight_step(state, batch, key):
    """Step 4 (a checkpoint step) turns w[0] NaN; the loss ignores w[0], so it stays finite."""
    w = state["w"] - 0.1 * (state["w"] - 1.0)
    w = w.at[0].set(jnp.where(state["step"] == 3, jnp.nan, w[0]))
    return {"w": w, "step": state["step"] + 1}, {"loss": jnp.sum((w[1:] - 1.0) ** 2)}


def test_nan_params_under_finite_loss_never_reach_a_checkpoint(tmp_path):
    state = {"w": jnp.zeros(4), "step": jnp.int32(0)}
    with pytest.raises(NonFiniteError) as err:
        train(_toy_cfg(tmp_path, steps=8, checkpoint_every=2), state=state,
              step_fn=jax.jit(_nan_weight_step), key=jax.random.key(0))
    message = str(err.value)
    assert "non-finite values at step 4" in message and "params" in message
    assert "last good checkpoint (step 2)" in message
    assert all(np.isfinite(r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl"))
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert list(ckpt.manager.all_steps()) == [2]
    restored, _, meta = ckpt.restore(state)
    assert meta["step"] == 2 and np.all(np.isfinite(restored["w"]))


def _carry_step(state, batch, key):
    """`_toy_step` that carries the rest of the state (a large constant) along."""
    new, metrics = _toy_step(state, batch, key)
    return {**state, **new}, metrics


def _large_state():
    """4 MiB of incompressible floats, so the checkpoint has one file over 1 MiB."""
    big = np.random.default_rng(0).random(1 << 20, dtype=np.float32)
    return {"w": jnp.zeros(4), "step": jnp.int32(0), "big": jnp.asarray(big)}


# Once checkpoint 2 is in place (its async save renamed into `2`) no file may grow past 1 MiB,
# so the kernel kills the process (SIGXFSZ, which Python ignores by default) at its first large
# write: inside the save of step 4.
_KILLED_IN_SAVE = """
import os, resource, signal, sys, time
import jax
sys.path.insert(0, sys.argv[2])
from test_loop import _carry_step, _large_state, _toy_cfg
from jaxrl.core.loop import train

jitted = jax.jit(_carry_step)

def step_fn(state, batch, key):
    if int(state["step"]) == 2:
        while not os.path.isdir(os.path.join(sys.argv[1], "checkpoints", "2")):
            time.sleep(0.01)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
    return jitted(state, batch, key)

train(_toy_cfg(sys.argv[1], steps=5, checkpoint_every=2), state=_large_state(), step_fn=step_fn,
      key=jax.random.key(0))
print("finished", flush=True)
"""


def test_kill_inside_a_save_resumes_from_the_previous_step(tmp_path, capsys):
    run_dir = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", _KILLED_IN_SAVE, str(run_dir),
                             str(Path(__file__).parent)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGXFSZ, killed.stderr[-3000:]
    assert "finished" not in killed.stdout
    entries = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "2" in entries and "4" not in entries
    assert any(name.startswith("4.") for name in entries), entries  # the torn save of step 4

    resumed = train(_toy_cfg(run_dir, steps=5, checkpoint_every=2), state=_large_state(),
                    step_fn=jax.jit(_carry_step), key=jax.random.key(0))
    assert "at step 2" in capsys.readouterr().out
    straight = train(_toy_cfg(tmp_path / "straight", steps=5, checkpoint_every=2),
                     state=_large_state(), step_fn=jax.jit(_carry_step), key=jax.random.key(0))
    assert resumed.step == straight.step == 5
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(straight.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 6))
    assert Checkpointer(run_dir / "checkpoints").latest_step() == 5


def test_sigterm_on_a_checkpoint_step_exits_cleanly(tmp_path):
    from jaxrl.core.loop import Preempted

    jitted = jax.jit(_toy_step)

    def step_fn(state, batch, key):
        if int(state["step"]) == 3:  # the signal lands during step 4, a checkpoint step
            os.kill(os.getpid(), signal.SIGTERM)
        return jitted(state, batch, key)

    state = {"w": jnp.zeros(4), "step": jnp.int32(0)}
    with pytest.raises(Preempted, match="saved step 4"):
        train(_toy_cfg(tmp_path, steps=5, checkpoint_every=2), state=state, step_fn=step_fn,
              key=jax.random.key(0))
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 4


def test_rerun_without_checkpoint_logs_each_step_once(tmp_path):
    state = {"w": jnp.zeros(4), "step": jnp.int32(0)}
    for _ in range(2):  # a first attempt that wrote metrics but no checkpoint, then a re-run
        train(_toy_cfg(tmp_path, steps=3), state=state, step_fn=jax.jit(_toy_step),
              key=jax.random.key(0))
        (tmp_path / "checkpoints").rename(tmp_path / f"old-{time.time()}")
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
