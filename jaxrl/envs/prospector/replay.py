"""Replays: record episodes of any policy to JSON Lines and read them back.

File format ("prospector-replay/1"), one JSON object per line:
- line 1, header: {"format", "env_impl", "seed", "episodes", "max_steps", "policy"}
- then one line per step: {"episode", "t", "action", "action_name", "valid", "reward",
  "terminated", "truncated", "ship": {sector, fuel, hull, credits, cargo[4], capacity,
  upgrades, last_damage}, "sector": {index, hazard, scanned, asteroids_left[8],
  asteroids_known[8]}, "prices": [[4] per station], "obs_summary": {time_left, fuel, hull,
  cargo_used, at_station, credits}}
`ship`/`sector`/`prices` are the state AFTER the action (before any auto-reset); `obs_summary`
is decoded from the observation the policy acted on. `episode` i replays
`evaluate.episode_keys(seed, episodes)[i]`, so for a deterministic policy (the bots) a replay's
return equals `evaluate_policy`'s for the same seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxrl.envs.prospector import jax_env
from jaxrl.envs.prospector import spec as S
from jaxrl.envs.prospector.evaluate import episode_keys

FORMAT = "prospector-replay/1"


def action_name(a: int) -> str:
    if a == S.A_WAIT:
        return "wait"
    if S.A_WARP <= a < S.A_SCAN:
        return f"warp {a - S.A_WARP}"
    if S.A_SCAN <= a < S.A_MINE:
        return f"scan {a - S.A_SCAN}"
    if S.A_MINE <= a < S.A_SELL:
        i = a - S.A_MINE
        return f"mine {i // S.N_DRILL_POWERS} power {i % S.N_DRILL_POWERS}"
    if S.A_SELL <= a < S.A_JETTISON:
        return f"sell {S.ORE_NAMES[a - S.A_SELL]}"
    if S.A_JETTISON <= a < S.A_SELL_ALL:
        return f"jettison {S.ORE_NAMES[a - S.A_JETTISON]}"
    names = {S.A_SELL_ALL: "sell all", S.A_REFUEL: "refuel", S.A_REPAIR: "repair",
             S.A_UPGRADE: "upgrade cargo"}
    return names.get(a, f"out of range ({a})")


def _step_record(episode, state, action, reward, terminated, truncated, obs) -> dict[str, Any]:
    ship = np.asarray(state.ship)
    sector = int(ship[S.S_SECTOR])
    ast = np.asarray(state.asteroids)[sector * S.N_ASTEROIDS : (sector + 1) * S.N_ASTEROIDS]
    sec = int(np.asarray(state.sectors)[sector])
    prices = np.asarray(state.market)[: S.N_STATIONS * S.N_ORES].reshape(S.N_STATIONS, S.N_ORES)
    return {
        "episode": episode,
        "t": int(ship[S.S_T]),
        "action": action,
        "action_name": action_name(action),
        "valid": not bool(ship[S.S_LAST_INVALID]),
        "reward": float(reward),
        "terminated": bool(terminated),
        "truncated": bool(truncated),
        "ship": {
            "sector": sector,
            "fuel": int(ship[S.S_FUEL]),
            "hull": int(ship[S.S_HULL]),
            "credits": int(ship[S.S_CREDITS]),
            "cargo": ship[S.S_CARGO : S.S_CARGO + S.N_ORES].tolist(),
            "capacity": int(ship[S.S_CAP]),
            "upgrades": int(ship[S.S_UPGRADES]),
            "last_damage": int(ship[S.S_LAST_DAMAGE]),
        },
        "sector": {
            "index": sector,
            "hazard": sec & 3,
            "scanned": bool(sec & S.SEC_SCANNED_BIT),
            "asteroids_left": (ast >> S.AST_LEFT_SHIFT).tolist(),
            "asteroids_known": ((ast & S.AST_KNOWN_BIT) != 0).tolist(),
        },
        "prices": prices.tolist(),
        "obs_summary": {
            "time_left": round(float(obs[0]) * 256),
            "fuel": round(float(obs[1]) * 64),
            "hull": round(float(obs[2]) * 128),
            "cargo_used": round(float(obs[3]) * 32),
            "at_station": bool(obs[11] > 0.5),
            "credits": round(float(obs[9]) * 4096),
        },
    }


def record(path: str | Path, policy_fn, env, params, *, seed: int, episodes: int = 1,
           policy_params: Any = None, policy_name: str = "") -> Path:
    """Play `episodes` seeded episodes of `policy_fn(key, obs, params)` and write a replay."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    act = jax.jit(policy_fn)
    # Step without auto-reset so the recorded state is the one the action produced.
    step = jax.jit(lambda s, a: jax_env.step_core(s, a, params.max_steps, params.invalid_penalty,
                                                  params.loss_penalty))
    observe = jax.jit(lambda s: jax_env.observe(s, params.max_steps))
    keys = episode_keys(seed, episodes)
    policy_keys = jax.random.split(jax.random.fold_in(keys[0], 2), episodes)
    header = {"format": FORMAT, "env_impl": getattr(env, "impl", "jax"), "seed": seed,
              "episodes": episodes, "max_steps": params.max_steps, "policy": policy_name}
    with path.open("w") as f:
        f.write(json.dumps(header) + "\n")
        for ep in range(episodes):
            obs, state = env.reset(keys[ep], params)
            key = policy_keys[ep]
            done = False
            while not done:
                key, k = jax.random.split(key)
                action = int(act(k, obs, policy_params))
                state, reward, terminated, truncated = step(state, action)
                done = bool(terminated) or bool(truncated)
                f.write(json.dumps(_step_record(ep, state, action, reward, terminated,
                                                truncated, np.asarray(obs))) + "\n")
                obs = observe(state)
    return path


def read(path: str | Path) -> tuple[dict, list[dict]]:
    """(header, steps) of a replay file; checks the format tag."""
    lines = Path(path).read_text().splitlines()
    if not lines:
        raise ValueError(f"{path}: empty replay file")
    header = json.loads(lines[0])
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (header: {lines[0][:80]})")
    return header, [json.loads(line) for line in lines[1:]]


def episode_returns(steps: list[dict]) -> list[float]:
    """Sum of rewards per episode, in episode order."""
    totals: dict[int, float] = {}
    for s in steps:
        totals[s["episode"]] = totals.get(s["episode"], 0.0) + s["reward"]
    return [totals[k] for k in sorted(totals)]
