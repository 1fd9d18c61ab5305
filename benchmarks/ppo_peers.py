"""PPO on CartPole-v1 against the peers a user would pick instead, same hyper-parameters, one run.

    python benchmarks/ppo_peers.py [--out benchmarks/results/ppo_peers.json] [--check]
                                   [--sb3-steps 20480]

Rows: jaxrl's recipe (`configs/ppo_cartpole.yaml` through `jaxrl.recipes.ppo.run`, the path a
user runs), rejax's PPO (PureJaxRL-style, whole run in one jit; in a process of its own that
never imports jaxrl, so with jaxlib's XLA defaults, as its users run it) and Stable-Baselines3's
PPO (PyTorch, 4 DummyVecEnv envs). Shared settings are PureJaxRL's CartPole config: 4 envs x 128
steps, 4 epochs x 4 minibatches, gamma 0.99, lambda 0.95, clip 0.2 (policy and value), vf 0.5,
ent 0.01, Adam 2.5e-4 annealed to 0, grad norm 0.5, 64x64 tanh actor and critic.
`env_steps_per_s` excludes compilation on the JAX rows (jaxrl's also excludes creating the
state, mostly its compile, and writing metrics.png); final return is the greedy policy's mean
over fresh episodes. SB3 runs a smaller budget by default (it is ~50x slower here), so its
return is at that budget, which the row states. A peer that cannot be imported gets a
"not installed" row (`pip install -e .[bench]`). `--check` exits 1 when a ratio in the JSON
falls below its floor in `benchmarks/floors.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

from machine import check_floors, machine_info  # benchmarks/ is on sys.path when run as a script

# The caller's XLA flags, before `import jaxrl` adds its YNN setting: each peer runs in its own
# process with these (jaxlib's defaults unless the caller set flags), as its users run it.
CALLER_XLA_FLAGS = os.environ.get("XLA_FLAGS")
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "ppo_cartpole.yaml"
# configs/ppo_cartpole.yaml's settings, spelled once for the peers.
HP = dict(num_envs=4, num_steps=128, epochs=4, minibatches=4, gamma=0.99, gae_lambda=0.95,
          clip_eps=0.2, vf_coef=0.5, ent_coef=0.01, lr=2.5e-4, max_grad_norm=0.5, hidden=(64, 64),
          updates=976)
EVAL_EPISODES = 32


def run_jaxrl() -> dict:
    import jaxrl  # noqa: F401  (its XLA flags, before JAX starts its backend)
    from jaxrl.launch import load
    from jaxrl.recipes.ppo import run

    assert not jax._src.xla_bridge.backends_are_initialized(), (
        "JAX's backend started before `import jaxrl`: the jaxrl row would miss its XLA flags")

    with tempfile.TemporaryDirectory() as run_dir:
        _, cfg = load(str(CONFIG), [f"run.dir={run_dir}", "loop.progress=false",
                                    f"eval.episodes={EVAL_EPISODES}"])
        assert (cfg.ppo.num_envs, cfg.ppo.rollout_steps, cfg.loop.steps) == (
            HP["num_envs"], HP["num_steps"], HP["updates"]), "ppo_cartpole.yaml drifted from HP"
        summary = run(cfg)
    return {"env_steps": summary["env_steps"], "env_steps_per_s": summary["env_steps_per_sec"],
            "wall_s": summary["train_seconds"], "compile_s": summary["compile_seconds"],
            "final_return": summary["returns"]["ppo"]["mean"],
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "how": "jaxrl.launch configs/ppo_cartpole.yaml: updates fused between log points "
                   "(loop.max_fused_steps); rate from the loop's steps/s clock (no compile, state "
                   "creation, evaluation or plotting)"}


class _FiveTuple:
    """gymnax >= 1.0 env -> the 5-tuple step rejax 0.1.3 unpacks (done = terminated | truncated,
    PureJaxRL's convention)."""

    def __init__(self, env):
        self.env = env

    def __getattr__(self, name):
        if name == "env":  # not yet set (copy.deepcopy builds the object without __init__)
            raise AttributeError(name)
        return getattr(self.env, name)

    def reset(self, key, params):
        return self.env.reset(key, params)

    def step(self, key, state, action, params):
        obs, state, reward, terminated, truncated, info = self.env.step(key, state, action, params)
        return obs, state, reward, terminated | truncated, info


def run_rejax() -> dict:
    import gymnax
    from rejax import PPO

    env, env_params = gymnax.make("CartPole-v1")
    steps = HP["updates"] * HP["num_envs"] * HP["num_steps"]
    algo = PPO.create(
        env=_FiveTuple(env), env_params=env_params, num_envs=HP["num_envs"],
        num_steps=HP["num_steps"], num_epochs=HP["epochs"], num_minibatches=HP["minibatches"],
        learning_rate=HP["lr"], max_grad_norm=HP["max_grad_norm"], total_timesteps=steps,
        eval_freq=steps, skip_initial_evaluation=True, gamma=HP["gamma"],
        gae_lambda=HP["gae_lambda"], clip_eps=HP["clip_eps"], ent_coef=HP["ent_coef"],
        vf_coef=HP["vf_coef"],
        agent_kwargs={"activation": "tanh", "hidden_layer_sizes": HP["hidden"]})
    start = time.perf_counter()
    train = jax.jit(algo.train).lower(jax.random.key(0)).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    _, (_, returns) = jax.block_until_ready(train(jax.random.key(0)))
    seconds = time.perf_counter() - start
    return {"env_steps": steps, "env_steps_per_s": round(steps / seconds),
            "wall_s": round(seconds + compile_s, 1), "compile_s": round(compile_s, 1),
            "final_return": round(float(returns[-1].mean()), 2),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "how": "rejax PPO.train, whole run in one jit (incl. its one evaluation, "
                   "128 episodes), in its own process with the caller's XLA flags ("
                   + ("jaxlib's defaults" if CALLER_XLA_FLAGS is None else "see xla_flags")
                   + "); no learning-rate annealing (rejax has none)"}


def in_own_process(peer: str) -> dict:
    """`peer`'s row from a fresh process that never imports jaxrl (so none of its flags)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if CALLER_XLA_FLAGS is not None:
        env["XLA_FLAGS"] = CALLER_XLA_FLAGS
    try:
        out = subprocess.run([sys.executable, __file__, "--peer", peer], env=env,
                             capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return {"error": f"{peer} did not finish in 1800 s"}
    if out.returncode == 0 and out.stdout.strip():
        try:
            return json.loads(out.stdout.splitlines()[-1])
        except json.JSONDecodeError:
            pass
    return {"error": f"{peer} exited {out.returncode} without a row: {out.stderr[-2000:]}"}


OWN_PROCESS = {"rejax": run_rejax}  # peers whose rows come from `in_own_process`


def run_sb3(steps: int) -> dict:
    import gymnasium as gym
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    env = make_vec_env("CartPole-v1", n_envs=HP["num_envs"], seed=0)
    batch = HP["num_envs"] * HP["num_steps"]
    model = PPO(
        "MlpPolicy", env, n_steps=HP["num_steps"], batch_size=batch // HP["minibatches"],
        n_epochs=HP["epochs"], gamma=HP["gamma"], gae_lambda=HP["gae_lambda"],
        clip_range=HP["clip_eps"], clip_range_vf=HP["clip_eps"], ent_coef=HP["ent_coef"],
        vf_coef=HP["vf_coef"], learning_rate=lambda progress: HP["lr"] * progress,
        max_grad_norm=HP["max_grad_norm"], seed=0, device="cpu", verbose=0,
        policy_kwargs=dict(net_arch=dict(pi=list(HP["hidden"]), vf=list(HP["hidden"])),
                           activation_fn=torch.nn.Tanh))
    start = time.perf_counter()
    model.learn(total_timesteps=steps)
    seconds = time.perf_counter() - start
    returns, _ = evaluate_policy(model, gym.make("CartPole-v1"), n_eval_episodes=EVAL_EPISODES,
                                 deterministic=True, return_episode_rewards=True)
    return {"env_steps": model.num_timesteps, "env_steps_per_s": round(model.num_timesteps / seconds),
            "wall_s": round(seconds, 1), "final_return": round(float(sum(returns)) / len(returns), 2),
            "how": f"stable-baselines3 {__import__('stable_baselines3').__version__}, torch "
                   f"{torch.__version__}, {torch.get_num_threads()} threads; budget {steps} "
                   "steps, not the JAX rows' 5e5"}


def guarded(name: str, fn, *args) -> dict:
    try:
        return fn(*args)
    except ImportError as e:
        return {"not_installed": f"{name}: {e} (pip install -e .[bench])"}


def ratios(rows: dict) -> dict:
    out, ours = {}, rows["jaxrl"]
    for peer in ("rejax", "sb3"):
        if "env_steps_per_s" in rows.get(peer, {}):
            out[f"steps_per_s_vs_{peer}"] = round(ours["env_steps_per_s"]
                                                  / rows[peer]["env_steps_per_s"], 3)
    if "final_return" in rows.get("rejax", {}):
        out["final_return_vs_rejax"] = round(ours["final_return"]
                                             / max(rows["rejax"]["final_return"], 1e-9), 3)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ppo_peers.json"))
    parser.add_argument("--sb3-steps", type=int, default=20_480)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--peer", choices=sorted(OWN_PROCESS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer:  # the child of in_own_process
        print(json.dumps(guarded(args.peer, OWN_PROCESS[args.peer])))
        return 0

    rows = {"jaxrl": run_jaxrl(), "rejax": in_own_process("rejax"),
            "sb3": guarded("stable-baselines3", run_sb3, args.sb3_steps)}
    report = {"benchmark": "ppo_peers", "env": "CartPole-v1", "hyper_parameters": HP,
              "machine": machine_info(), "rows": rows, "ratios": ratios(rows)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if not args.check:
        return 0
    failed = [name for name, row in rows.items() if "error" in row]
    for name in failed:  # a crashed peer has no ratio, which check_floors would let through
        print(f"{name} failed: {rows[name]['error'][:300]}", file=sys.stderr)
    below = check_floors("ppo_peers", report["ratios"], machine=report["machine"])
    return below or int(bool(failed))


if __name__ == "__main__":
    sys.exit(main())
