"""Prospector throughput: env steps/s of the JAX core vs the C++ (XLA FFI) core.

  python benchmarks/prospector.py --out runs/bench_prospector.json [--envs 64 1024 8192]

Each measurement jits a `lax.scan` of `--steps` auto-resetting steps over N envs with cheap
pseudo-random actions (an integer hash, so action generation costs ~nothing) and times it after
a warm-up call. Steps/s counts env transitions (N * steps / seconds).
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
    from machine import machine_info  # benchmarks/ is on sys.path when run as a script
    from ppo_throughput import ppo_throughput

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, nargs="+", default=[64, 1024, 8192])
    parser.add_argument("--steps", type=int, default=0, help="steps per timed call (0: auto)")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()
    results = {
        "machine": machine_info(),
        "env_steps_per_s": env_benchmark(args.envs, args.steps),
        "ppo_default_config": {impl: ppo_throughput(env_impl=impl) for impl in
                               (["jax", "native"] if native.available() else ["jax"])},
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
