"""Prospector throughput: env steps/s of the JAX core vs the C++ (XLA FFI) core.

  python benchmarks/prospector.py --out runs/bench_prospector.json [--envs 64 1024 8192] [--check]

Each measurement jits a `lax.scan` of `--steps` auto-resetting steps over N envs with cheap
pseudo-random actions (an integer hash, so action generation costs ~nothing) and times it after
a warm-up call. Steps/s counts env transitions (N * steps / seconds). `ratios`: the native core
over the JAX core at each size (same run), the slowest native size over the 5M goal and PPO
end to end over its 100k goal; `--check` compares them with benchmarks/floors.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from jaxrl.envs import make
from jaxrl.envs.prospector import native

NATIVE_GOAL = 5_000_000  # env steps/s of the native core at every batch size (issue #14)


def env_steps_per_second(impl: str, num_envs: int, num_steps: int, repeats: int = 3) -> float:
    """Best-of-`repeats` env steps/s for one core at one batch size."""
    env, params = make("prospector", env_impl=impl)
    keys = jax.random.split(jax.random.PRNGKey(0), num_envs)
    obs, state = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))(keys, params)
    step = jax.vmap(env.step, in_axes=(None, 0, 0, None))
    env_ids = jnp.arange(num_envs, dtype=jnp.uint32)

    @jax.jit
    def rollout(state):
        def body(carry, t):
            state, total = carry
            h = (env_ids * jnp.uint32(0x9E3779B9)) ^ (t * jnp.uint32(0x85EBCA6B))
            action = ((h >> 7) % jnp.uint32(69)).astype(jnp.int32)
            obs, state, reward, terminated, truncated, _ = step(None, state, action, params)
            return (state, total + reward.sum() + obs[:, 0].sum()), None

        init = (state, jnp.float32(0))
        return jax.lax.scan(body, init, jnp.arange(num_steps, dtype=jnp.uint32))[0]

    jax.block_until_ready(rollout(state))  # compile + warm up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(rollout(state))
        best = max(best, num_envs * num_steps / (time.perf_counter() - start))
    return best


def env_benchmark(env_counts=(64, 1024, 8192), steps_per_call: int = 0) -> dict:
    """{"jax": {N: steps/s}, "native": {N: steps/s}} (native only when the core is built)."""
    impls = ["jax"] + (["native"] if native.available() else [])
    out = {}
    for impl in impls:
        out[impl] = {}
        for n in env_counts:
            steps = steps_per_call or max(50, 400_000 // n)
            out[impl][str(n)] = round(env_steps_per_second(impl, n, steps))
            print(f"{impl:7s} {n:6d} envs: {out[impl][str(n)]:>12,} env steps/s", flush=True)
    return out


def main():
    from machine import check_floors, machine_info  # benchmarks/ is on sys.path as a script
    from ppo_throughput import GOAL, ppo_throughput

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, nargs="+", default=[64, 1024, 8192])
    parser.add_argument("--steps", type=int, default=0, help="steps per timed call (0: auto)")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--check", action="store_true", help="exit 1 when a ratio is below its floor")
    args = parser.parse_args()
    results = {
        "machine": machine_info(),
        "env_steps_per_s": env_benchmark(args.envs, args.steps),
        "ppo_default_config": {impl: ppo_throughput(env_impl=impl) for impl in
                               (["jax", "native"] if native.available() else ["jax"])},
    }
    results["ratios"] = ratios(results["env_steps_per_s"], results["ppo_default_config"], GOAL)
    print(json.dumps(results["ratios"], indent=2))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return check_floors("prospector", results["ratios"],
                        machine=results["machine"]) if args.check else 0


def ratios(env_steps: dict, ppo: dict, ppo_goal: int) -> dict:
    """Higher is better in each, as --check reads them."""
    out = {}
    if "native" in env_steps:
        for n, rate in env_steps["native"].items():
            out[f"native_over_jax_{n}_envs"] = round(rate / env_steps["jax"][n], 2)
        out["native_slowest_over_goal"] = round(min(env_steps["native"].values()) / NATIVE_GOAL, 3)
    for impl, row in ppo.items():
        out[f"ppo_{impl}_over_goal"] = round(row["ppo_env_steps_per_sec"] / ppo_goal, 3)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
