"""Evaluate Prospector bots over many seeded episodes and print mean/median return.

Every policy plays the same `episodes` episodes (episode i starts from
`split(PRNGKey(run.seed), episodes)[i]`), so the numbers compare like with like. Optionally
records a JSONL replay of the first `replay_episodes` episodes of each policy. Writes
`<run dir>/summary.json`.

  python -m jaxrl.launch configs/eval_prospector.yaml
  python -m jaxrl.launch configs/eval_prospector.yaml episodes=4096 env_impl=jax
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Literal

from jaxrl.core.config import ConfigError, RecipeConfig
from jaxrl.envs import make
from jaxrl.envs.prospector import bots, replay
from jaxrl.envs.prospector.evaluate import evaluate_policy, summarize

__all__ = ["Config", "run", "evaluate_policy", "summarize", "POLICIES"]

POLICIES = {**bots.BOTS, "random": bots.random_policy}


@dataclasses.dataclass
class Config(RecipeConfig):
    env_impl: Literal["auto", "jax", "native"] = "auto"
    episodes: int = 1024
    max_steps: int = 200
    policies: list[str] = dataclasses.field(default_factory=lambda: list(POLICIES))
    replay_episodes: int = 0  # >0: write <run dir>/replays/<policy>.jsonl

    def validate(self):
        if self.episodes < 1 or self.max_steps < 1 or self.replay_episodes < 0:
            raise ConfigError("episodes and max_steps must be >= 1, replay_episodes >= 0.")
        if unknown := [p for p in self.policies if p not in POLICIES]:
            raise ConfigError(f"policies: unknown {unknown}; choose from {list(POLICIES)}.")


def run(cfg: Config) -> dict:
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    env, params = make("prospector", env_impl=cfg.env_impl, max_steps=cfg.max_steps)
    results = {}
    print(f"prospector eval: {cfg.episodes} episodes, seed {cfg.run.seed}, env_impl={env.impl}")
    for name in cfg.policies:
        start = time.perf_counter()
        returns = evaluate_policy(POLICIES[name], env, params, cfg.episodes, cfg.run.seed)
        results[name] = {**summarize(returns), "seconds": round(time.perf_counter() - start, 2)}
        r = results[name]
        print(f"  {name:17s} mean {r['mean']:8.2f}  median {r['median']:8.2f}  "
              f"std {r['std']:7.2f}  ({r['seconds']} s)", flush=True)
        if cfg.replay_episodes:
            replay.record(run_dir / "replays" / f"{name}.jsonl", POLICIES[name], env, params,
                          seed=cfg.run.seed, episodes=cfg.replay_episodes, policy_name=name)
    summary = {"env_impl": env.impl, "episodes": cfg.episodes, "seed": cfg.run.seed,
               "max_steps": cfg.max_steps, "policies": results}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
