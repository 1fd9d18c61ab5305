"""The loop's platform contract, in-process on toy steps: preemption by SIGHUP, torn metrics,
leftover temporary checkpoints, no eval on a rejected state, no state built twice on resume,
honest steps/s, a finished run that says so, and a config that starts no JAX backend."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from jaxrl.core.checkpoint import Checkpointer
from jaxrl.core.config import LoopConfig, RecipeConfig, RunConfig
from jaxrl.core.loop import NonFiniteError, Preempted, train
from jaxrl.core.mesh import make_mesh
from jaxrl.core.config import MeshConfig
from jaxrl.core.metrics import read_jsonl
from jaxrl.core.step import compile_step, sharded_init


def cfg(tmp_path, steps, **loop):
    loop = {"log_every": 1, "progress": False, **loop}
    return RecipeConfig(run=RunConfig(dir=str(tmp_path)), loop=LoopConfig(steps=steps, **loop))


def toy_init():
    return {"w": jnp.zeros(8), "step": jnp.zeros((), jnp.int32)}


def toy_step(state, batch, key):
    w = state["w"] + jax.random.uniform(key, state["w"].shape)
    return {"w": w, "step": state["step"] + 1}, {"loss": jnp.mean(w)}


@pytest.fixture(scope="module")
def program():
    mesh = make_mesh(MeshConfig())
    init = sharded_init(toy_init, mesh)
    return init, compile_step(toy_step, mesh, init.shardings, batch_shardings=None)


def test_sighup_saves_at_the_next_step_and_resume_is_exact(tmp_path, program):
    init, step = program

    def hangup_at_3(state, batch, key):
        out = step(state, batch, key)
        if int(out[0]["step"]) == 3:
            os.kill(os.getpid(), signal.SIGHUP)
        return out

    with pytest.raises(Preempted, match="SIGHUP: saved step 3"):
        train(cfg(tmp_path / "cut", 6), state=init, step_fn=hangup_at_3, key=jax.random.key(0))
    assert Checkpointer(tmp_path / "cut" / "checkpoints").latest_step() == 3
    resumed = train(cfg(tmp_path / "cut", 6), state=init, step_fn=step, key=jax.random.key(0))
    straight = train(cfg(tmp_path / "straight", 6), state=init, step_fn=step,
                     key=jax.random.key(0))
    np.testing.assert_array_equal(resumed.state["w"], straight.state["w"])
    assert resumed.trained_steps == 3


def test_resume_restores_into_the_abstract_layout_without_building_a_state(tmp_path, program):
    init, step = program
    train(cfg(tmp_path, 2, checkpoint_every=1), state=init, step_fn=step, key=jax.random.key(0))
    calls = []
    counted = type(init)(fn=lambda: calls.append(1) or init(), abstract=init.abstract,
                         shardings=init.shardings)
    again = train(cfg(tmp_path, 4), state=counted, step_fn=step, key=jax.random.key(0))
    assert calls == [] and again.step == 4
    assert again.state["w"].sharding == init.shardings["w"]


def test_a_finished_run_says_so_and_trains_nothing(tmp_path, program, capsys):
    init, step = program
    train(cfg(tmp_path, 2), state=init, step_fn=step, key=jax.random.key(0))
    capsys.readouterr()
    again = train(cfg(tmp_path, 2), state=init, step_fn=step, key=jax.random.key(0))
    assert again.trained_steps == 0 and again.step == 2
    assert "nothing left to train" in capsys.readouterr().out


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path, program):
    init, step = program
    train(cfg(tmp_path, 2, checkpoint_every=2), state=init, step_fn=step, key=jax.random.key(0))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.5')  # a crash mid-write
    train(cfg(tmp_path, 4), state=init, step_fn=step, key=jax.random.key(0))
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('oops\n{"step": 9}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:\d+: not a JSON row"):
        read_jsonl(tmp_path / "metrics.jsonl", drop_torn_tail=True)


def test_leftover_temporary_checkpoint_dirs_are_removed_on_start(tmp_path, program):
    init, step = program
    train(cfg(tmp_path, 2, checkpoint_every=1), state=init, step_fn=step, key=jax.random.key(0))
    torn = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234"
    torn.mkdir()
    (torn / "partial").write_text("a save killed mid-write")
    result = train(cfg(tmp_path, 3), state=init, step_fn=step, key=jax.random.key(0))
    assert not torn.exists() and result.step == 3


def test_eval_never_sees_a_state_the_nan_guard_rejects(tmp_path, program):
    """Params go NaN while the logged loss stays finite: the guard stops before eval runs."""
    init, _ = program

    def poison(state, batch, key):
        w = jnp.where(state["step"] >= 1, jnp.nan, state["w"])
        return {"w": w, "step": state["step"] + 1}, {"loss": jnp.float32(1.0)}

    seen = []
    with pytest.raises(NonFiniteError, match="non-finite values at step 2: params"):
        train(cfg(tmp_path, 4, eval_every=2), state=init, step_fn=jax.jit(poison),
              key=jax.random.key(0), eval_fn=lambda state, step: seen.append(step) or {})
    assert seen == []


def test_steps_per_sec_excludes_compile_and_eval(tmp_path, program):
    init, step = program

    def slow_eval(state, at_step):
        time.sleep(1.0)
        return {"eval": 1.0}

    result = train(cfg(tmp_path, 6, log_every=2, eval_every=2), state=init, step_fn=step,
                   key=jax.random.key(0), eval_fn=slow_eval)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    rates = [r["steps_per_sec"] for r in rows if "steps_per_sec" in r]
    assert [r["time/eval_s"] >= 1.0 for r in rows if "time/eval_s" in r] == [True] * 3
    assert "time/compile_s" in rows[0]
    assert min(rates) > 10  # a 1 s eval every 2 steps would cap it at 2 steps/s
    # The run's clock (what PPO's env_steps_per_sec reads): the 4 steps after the compiling
    # call, none of the three 1 s evaluations.
    assert result.timed_steps == 4 and result.timers["step_s"] < 1.0


def test_loading_a_config_starts_no_jax_backend():
    """`distributed.*` must be applied before any backend exists: importing the recipe (its envs,
    models, gymnax) and validating the config must not start one."""
    code = ("from jaxrl.launch import load\n"
            "load('ppo_prospector', ['distributed.local_device_count=2'])\n"
            "load('sft_gpt2_shakespeare', [])\n"
            "from jax._src import xla_bridge\n"
            "assert not xla_bridge._backends, list(xla_bridge._backends)\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_unknown_env_name_is_a_config_error_before_compiling(tmp_path, capsys):
    from jaxrl.launch import main

    assert main(["ppo_cartpole", "env.name=CartPol-v1", f"run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "env.name 'CartPol-v1' unknown" in err and "CartPole-v1" in err
    assert not (tmp_path / "checkpoints").exists()


def test_fused_steps_equal_one_at_a_time_and_stop_at_every_cadence_point(tmp_path, program):
    init, step = program
    calls = []

    class Counting(type(step)):
        def steps(self, state, key, first, count, length):
            calls.append((first, count))
            return super().steps(state, key, first, count, length)

    counted = Counting(toy_step, init.shardings, None, step._jit["out_shardings"][1], True)
    fused = train(cfg(tmp_path / "fused", 10, log_every=4, checkpoint_every=3), state=init,
                  step_fn=counted, key=jax.random.key(1))
    single = train(cfg(tmp_path / "single", 10, log_every=4, checkpoint_every=3,
                       max_fused_steps=1), state=init, step_fn=step, key=jax.random.key(1))
    assert calls == [(0, 3), (3, 1), (4, 2), (6, 2), (8, 1), (9, 1)]
    assert len(counted._fused) == 1  # one program for the counts 3, 2 and 1
    np.testing.assert_array_equal(fused.state["w"], single.state["w"])
    rows = [read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("fused", "single")]
    assert [(r["step"], r["loss"]) for r in rows[0]] == [(r["step"], r["loss"]) for r in rows[1]]
    assert Checkpointer(tmp_path / "fused" / "checkpoints").latest_step() == 10


def test_a_weakly_typed_initial_state_compiles_the_step_once():
    """`jnp.full(shape, 4.0)` is weakly typed and the step's outputs are not: without the
    initial state made strong, the second step traces and compiles the whole step again."""
    def weak_init():
        return {"w": jnp.full((8,), 4.0), "step": jnp.zeros((), jnp.int32)}

    assert jax.eval_shape(weak_init)["w"].weak_type
    mesh = make_mesh(MeshConfig())
    init = sharded_init(weak_init, mesh)
    step = compile_step(toy_step, mesh, init.shardings, batch_shardings=None)
    state = init()
    for i in range(3):
        state, _ = step(state, None, jax.random.key(i))
    assert step._one._cache_size() == 1


def test_only_dots_compile_to_ynn_kernels_unless_the_user_asks():
    """jaxrl keeps XLA:CPU's YNNPACK kernels for dots and turns off its elementwise / reduce
    fusions (they crash or hang on some CPUs, see jaxrl/__init__); a user's own
    `--xla_cpu_experimental_ynn_fusion_type` is left alone."""
    programs = {"dot": "lambda a, b: a @ b", "eltwise": "lambda a, b: jnp.tanh(a * b).sum(0)"}

    def fusions(program, xla_flags):
        code = ("import jaxrl, jax, jax.numpy as jnp\n"
                f"f = jax.jit({programs[program]})\n"
                "x = jnp.ones((64, 64))\n"
                "print('ynn' if '__ynn_fusion' in f.lower(x, x).compile().as_text() else 'none')\n")
        env = {**os.environ, "XLA_FLAGS": xla_flags}
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout.split()[-1]

    assert (fusions("dot", ""), fusions("eltwise", "")) == ("ynn", "none")
    everything = "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"  # jaxlib's own default
    assert fusions("eltwise", everything) == "ynn"
    assert fusions("dot", "--xla_cpu_experimental_ynn_fusion_type=") == "none"
