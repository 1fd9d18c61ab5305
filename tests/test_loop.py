"""The shared train loop: exact resume after SIGTERM, NaN guard, crash-safe checkpoints."""

import json
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

from conftest import REPO, TINY_SFT_OVERRIDES, run_launch
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


def test_sigterm_then_rerun_resumes_exactly(tmp_path, corpus):
    steps = 40
    args = ["sft_gpt2_shakespeare", f"data.path={corpus}", f"loop.steps={steps}",
            "loop.checkpoint_every=15", "loop.eval_every=0", *TINY_SFT_OVERRIDES]
    straight = run_launch(*args, f"run.dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-3000:]

    resumed = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "jaxrl.launch", *args, f"run.dir={resumed}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = resumed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 8:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saved step" in out, "the run finished before SIGTERM arrived"
    stopped_at = Checkpointer(resumed / "checkpoints").latest_step()
    assert 8 <= stopped_at < steps

    again = run_launch(*args, f"run.dir={resumed}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout

    step_a, params_a = _params(tmp_path / "straight")
    step_b, params_b = _params(resumed)
    assert step_a == step_b == steps
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise

    logged = [r["step"] for r in read_jsonl(metrics) if "loss" in r]
    assert logged == list(range(1, steps + 1))
    straight_losses = [r["loss"] for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl")
                       if "loss" in r]
    assert straight_losses[-1] < 0.7 * straight_losses[0]  # the small SFT run learns
    assert straight_losses == [r["loss"] for r in read_jsonl(metrics) if "loss" in r]


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


_KILL_SAVE = """
import sys, numpy as np, jax.numpy as jnp
from jaxrl.core.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1], keep=5, async_save=False)
ckpt.save(1, {"w": jnp.full((1000,), 1.0)}, meta={"step": 1})
print("saved 1", flush=True)
ckpt.save(2, {"w": jnp.asarray(np.random.rand(int(4e8) // 4).astype(np.float32))}, meta={"step": 2})
print("saved 2", flush=True)
"""


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SAVE, str(directory)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved 1"
    deadline = time.time() + 60
    while time.time() < deadline and not any("2" in p.name for p in directory.iterdir()):
        time.sleep(0.01)  # wait until step 2 is being written
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    assert "saved 2" not in proc.stdout.read(), "the save finished before the kill"
    proc.wait()
    ckpt = Checkpointer(directory)
    assert ckpt.latest_step() == 1
    restored, _, meta = ckpt.restore({"w": jnp.zeros((1000,))})
    assert meta == {"step": 1} and float(restored["w"].sum()) == 1000.0


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
