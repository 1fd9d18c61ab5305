"""Evaluate Prospector bots over many seeded episodes and print mean/median return.

Every policy plays the same `episodes` episodes (episode i starts from
`split(PRNGKey(run.seed), episodes)[i]`), so the numbers compare like with like. Optionally
records a JSONL replay of the first `replay_episodes` episodes of each policy. Writes
`<run dir>/summary.json`.

`ppo_runs` adds trained agents: each PPO run dir (its config.yaml and newest checkpoint) plays
the same episodes as the bots, named `ppo-<run dir name>`, acting as its own `eval.greedy`
says; with replays, the agent and the bots can be watched on the same seed
(`python -m jaxrl.view <run dir>`).

  python -m jaxrl.launch configs/eval_prospector.yaml
  python -m jaxrl.launch configs/eval_prospector.yaml episodes=4096 env_impl=jax
  python -m jaxrl.launch configs/eval_prospector.yaml "ppo_runs=[runs/ppo_prospector]" \
      replay_episodes=2
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Literal

import jax
import numpy as np

from jaxrl.core.config import ConfigError, RecipeConfig
from jaxrl.envs import make
from jaxrl.envs.prospector import bots, replay
from jaxrl.envs.prospector.evaluate import episode_keys, evaluate_policy, summarize
from jaxrl.envs.rollout import play_episodes

# Refused with several processes (checked by `jaxrl.launch` before any device work).
SINGLE_PROCESS = ("the bots and replays are host-side episode loops on one host's "
                  "devices; run it on one host")

__all__ = ["Config", "run", "evaluate_policy", "summarize", "POLICIES"]

POLICIES = {**bots.BOTS, "random": bots.random_policy}


@dataclasses.dataclass
class Config(RecipeConfig):
    env_impl: Literal["auto", "jax", "native"] = "auto"
    episodes: int = 1024
    max_steps: int = 200
    policies: list[str] = dataclasses.field(default_factory=lambda: list(POLICIES))
    replay_episodes: int = 0  # >0: write <run dir>/replays/<policy>.jsonl
    ppo_runs: list[str] = dataclasses.field(default_factory=list)  # PPO run dirs to evaluate too

    def validate(self):
        if self.episodes < 1 or self.max_steps < 1 or self.replay_episodes < 0:
            raise ConfigError("episodes and max_steps must be >= 1, replay_episodes >= 0.")
        if unknown := [p for p in self.policies if p not in POLICIES]:
            raise ConfigError(f"policies: unknown {unknown}; choose from {list(POLICIES)}.")
        for d in self.ppo_runs:
            if not (Path(d) / "config.yaml").is_file():
                raise ConfigError(f"ppo_runs: {d!r} has no config.yaml; give a PPO run directory.")


def load_ppo_policy(run_dir: str | Path):
    """A trained PPO agent from its run dir, as a batched `act(key, obs[N], mask[N]) -> [N]`.

    Rebuilds the model from the run's config.yaml through the PPO recipe and restores the
    newest checkpoint into it; acts greedily or by sampling as the run's `eval.greedy` says.
    """
    from jaxrl import launch
    from jaxrl.core.checkpoint import Checkpointer

    run_dir = Path(run_dir)
    module, cfg = launch.load(str(run_dir / "config.yaml"), [])
    if cfg.recipe != "ppo" or cfg.env.name.lower() != "prospector":
        raise ConfigError(f"ppo_runs: {run_dir} is a {cfg.recipe!r} run on {cfg.env.name!r}; "
                          "only PPO runs on prospector can play here.")
    ckpt_dir = getattr(cfg.run, "checkpoint_dir", "") or run_dir / "checkpoints"
    if not str(ckpt_dir).startswith("gs://") and not Path(ckpt_dir).is_dir():
        raise ConfigError(f"ppo_runs: {run_dir} has no checkpoints ({ckpt_dir}) to load the "
                          "agent from.")
    ppo = module.make_ppo(cfg)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    template = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                            jax.eval_shape(ppo.init, jax.random.PRNGKey(0)))
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise ConfigError(f"ppo_runs: no checkpoint in {ckpt_dir}.")
        params = ckpt.restore(template)[0].params
    finally:
        ckpt.close()
    greedy = cfg.eval.greedy
    return lambda key, obs, mask: ppo.act(params, key, obs, mask, greedy=greedy)


def evaluate_act(act, env, params, num_episodes: int, seed: int) -> np.ndarray:
    """`evaluate_policy` for a batched, mask-aware `act`: the same episodes, the same step keys."""
    reset_keys = episode_keys(seed, num_episodes)
    step_keys = jax.random.split(jax.random.fold_in(reset_keys[0], 1), params.max_steps)
    ret, running, _ = jax.jit(lambda: play_episodes(env, params, act, reset_keys, step_keys))()
    if bool(running.any()):
        raise RuntimeError("some episodes did not end within the time limit")
    return np.asarray(ret, np.float32)


def run(cfg: Config) -> dict:
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    env, params = make("prospector", env_impl=cfg.env_impl, max_steps=cfg.max_steps)
    results = {}
    print(f"prospector eval: {cfg.episodes} episodes, seed {cfg.run.seed}, env_impl={env.impl}")
    agents = {name: replay.per_observation(POLICIES[name]) for name in cfg.policies}
    agents.update({f"ppo-{Path(d).resolve().name}": load_ppo_policy(d) for d in cfg.ppo_runs})
    for name, act in agents.items():
        start = time.perf_counter()
        returns = evaluate_act(act, env, params, cfg.episodes, cfg.run.seed)
        results[name] = {**summarize(returns), "seconds": round(time.perf_counter() - start, 2)}
        r = results[name]
        print(f"  {name:17s} mean {r['mean']:8.2f}  median {r['median']:8.2f}  "
              f"std {r['std']:7.2f}  ({r['seconds']} s)", flush=True)
    if cfg.replay_episodes:
        replay.write_policy_replays(run_dir, agents, env, params, seed=cfg.run.seed,
                                    episodes=cfg.replay_episodes)
    summary = {"env_impl": env.impl, "episodes": cfg.episodes, "seed": cfg.run.seed,
               "max_steps": cfg.max_steps, "policies": results}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
