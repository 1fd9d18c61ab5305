"""PPO end-to-end throughput (env steps + learning) with a recipe config; JSON out.

    python benchmarks/ppo_throughput.py [--config configs/ppo_prospector.yaml] [--updates 20]
                                        [--env-impl jax,native] [--out ppo_throughput.json]
                                        [--check] [key.sub=value ...]  (config overrides)

For each env core it times whole jitted PPO updates (rollout + GAE + epochs, after one warm-up
update that compiles) and, separately, the rollout alone, so the JSON says where time goes:
`learn_fraction` is the share of an update spent outside the rollout. `benchmarks/prospector.py`
imports `ppo_throughput` for its PPO section.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax

from machine import check_floors, machine_info  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "ppo_prospector.yaml"
GOAL = 100_000  # env steps/s, PPO end to end (issue #14)


def _timed(fn, state, updates: int) -> tuple[float, object]:
    state = jax.block_until_ready(fn(state, jax.random.key(0))[0])  # compile + warm up
    start = time.perf_counter()
    for i in range(updates):
        state = fn(state, jax.random.key(i + 1))[0]
    jax.block_until_ready(state)
    return time.perf_counter() - start, state


def ppo_throughput(config: str | Path = DEFAULT_CONFIG, *, updates: int = 20,
                   env_impl: str | None = None, overrides: list[str] = ()) -> dict:
    """Env steps per second of full PPO updates and of the rollout alone, for one env core."""
    from jaxrl.launch import load
    from jaxrl.recipes.ppo import make_ppo

    extra = [f"env.env_impl={env_impl}"] if env_impl else []
    _, cfg = load(str(config), [*overrides, *extra])
    ppo = make_ppo(cfg)
    state = jax.jit(ppo.init)(jax.random.key(cfg.run.seed))
    steps = ppo.env_steps_per_update

    update = jax.jit(ppo.update, donate_argnums=0)
    update_seconds, state = _timed(update, state, updates)
    rollout = jax.jit(ppo.rollout)
    rollout_seconds, _ = _timed(rollout, state, updates)
    return {
        "env": cfg.env.name,
        "env_impl": getattr(ppo.env, "impl", "jax"),
        "num_envs": cfg.ppo.num_envs,
        "rollout_steps": cfg.ppo.rollout_steps,
        "epochs": cfg.ppo.epochs,
        "minibatches": cfg.ppo.minibatches,
        "hidden": list(cfg.policy.hidden),
        "updates_timed": updates,
        "env_steps_per_update": steps,
        "ppo_env_steps_per_sec": round(updates * steps / update_seconds),
        "rollout_env_steps_per_sec": round(updates * steps / rollout_seconds),
        "learn_fraction": round(max(0.0, 1 - rollout_seconds / update_seconds), 3),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--env-impl", default="jax,native", help="comma-separated env cores")
    parser.add_argument("--out", default="")
    parser.add_argument("--check", action="store_true", help="exit 1 when a ratio is below its floor")
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    args = parser.parse_args(argv)

    from jaxrl.envs.prospector import native

    runs = []
    for impl in args.env_impl.split(","):
        if impl == "native" and not native.available():
            runs.append({"env_impl": "native", "skipped": "C++ core not built (pip install -e .)"})
            continue
        runs.append(ppo_throughput(args.config, updates=args.updates, env_impl=impl,
                                   overrides=args.overrides))
    report = {
        "benchmark": "ppo_throughput",
        "config": args.config,
        "machine": machine_info(),
        "goal_env_steps_per_sec": GOAL,
        "runs": runs,
        "ratios": {f"{r['env_impl']}_over_goal": round(r["ppo_env_steps_per_sec"] / GOAL, 3)
                   for r in runs if "ppo_env_steps_per_sec" in r},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return check_floors("ppo_throughput", report["ratios"],
                        machine=report["machine"]) if args.check else 0


if __name__ == "__main__":
    sys.exit(main())
