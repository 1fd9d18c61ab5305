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
return equals `evaluate_policy`'s for the same seed. `write_policy_replays` writes one replay
per named policy of the same episodes (the PPO recipe's agent beside the bots).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxrl.envs.prospector import bots, jax_env
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


def state_frame(state) -> dict[str, Any]:
    """What a viewer draws: the ship, the sector it is in, and the station prices."""
    ship = np.asarray(state.ship)
    sector = int(ship[S.S_SECTOR])
    ast = np.asarray(state.asteroids)[sector * S.N_ASTEROIDS : (sector + 1) * S.N_ASTEROIDS]
    sec = int(np.asarray(state.sectors)[sector])
    prices = np.asarray(state.market)[: S.N_STATIONS * S.N_ORES].reshape(S.N_STATIONS, S.N_ORES)
    return {
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
    }


def step_record(episode, state, action, reward, terminated, truncated, obs) -> dict[str, Any]:
    """One replay line: `state` is the state after `action`, `obs` the one it was chosen from."""
    ship = np.asarray(state.ship)
    return {
        "episode": episode,
        "t": int(ship[S.S_T]),
        "action": action,
        "action_name": action_name(action),
        "valid": not bool(ship[S.S_LAST_INVALID]),
        "reward": float(reward),
        "terminated": bool(terminated),
        "truncated": bool(truncated),
        **state_frame(state),
        "obs_summary": {
            "time_left": round(float(obs[0]) * 256),
            "fuel": round(float(obs[1]) * 64),
            "hull": round(float(obs[2]) * 128),
            "cargo_used": round(float(obs[3]) * 32),
            "at_station": bool(obs[11] > 0.5),
            "credits": round(float(obs[9]) * 4096),
        },
    }


@functools.lru_cache(maxsize=8)
def stepper(params):
    """Jitted `start(key) -> (obs, state, mask)` and `advance(state, action) -> (state, reward,
    terminated, truncated, obs, mask)` for these env params, compiled once per process.

    `advance` does not auto-reset, so a replay records the state the action produced. Both use
    the JAX core, which matches the C++ core bit for bit.
    """
    def start(key):
        state = jax_env.reset_core(jax_env.seed_from_key(key))
        return jax_env.observe(state, params.max_steps), state, jax_env.action_mask(state)

    def advance(state, action):
        state, reward, terminated, truncated = jax_env.step_core(
            state, action, params.max_steps, params.invalid_penalty, params.loss_penalty)
        return (state, reward, terminated, truncated, jax_env.observe(state, params.max_steps),
                jax_env.action_mask(state))

    return jax.jit(start), jax.jit(advance)


def per_observation(policy_fn, policy_params: Any = None):
    """A bot-style `policy_fn(key, obs, params) -> action` as a batched `act(key, obs, mask)`."""
    per_obs = jax.vmap(policy_fn, in_axes=(0, 0, None))
    return lambda key, obs, mask: per_obs(jax.random.split(key, obs.shape[0]), obs, policy_params)


def make_header(*, seed: int, episodes: int, max_steps: int, policy: str,
                env_impl: str = "jax") -> dict:
    return {"format": FORMAT, "env_impl": env_impl, "seed": seed, "episodes": episodes,
            "max_steps": max_steps, "policy": policy}


def record_act(path: str | Path, act, env, params, *, seed: int, episodes: int = 1,
               policy_name: str = "") -> Path:
    """Play `episodes` seeded episodes of a batched `act(key, obs[N, D], mask[N, A]) -> int[N]`
    (the signature of PPO's evaluator) one env at a time, and write a replay.

    `env` only names its core in the header: stepping uses the JAX core (`stepper`), which is
    bit-identical to the C++ one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    act = jax.jit(act)
    start, advance = stepper(params)
    keys = episode_keys(seed, episodes)
    policy_keys = jax.random.split(jax.random.fold_in(keys[0], 2), episodes)
    tmp = path.with_name(path.name + ".tmp")  # a viewer never sees a half-written replay
    with tmp.open("w") as f:
        f.write(json.dumps(make_header(seed=seed, episodes=episodes, max_steps=params.max_steps,
                                  policy=policy_name, env_impl=getattr(env, "impl", "jax"))) + "\n")
        for ep in range(episodes):
            obs, state, mask = start(keys[ep])
            key = policy_keys[ep]
            done = False
            while not done:
                key, k = jax.random.split(key)
                action = int(act(k, obs[None], mask[None])[0])
                state, reward, terminated, truncated, next_obs, mask = advance(state, action)
                done = bool(terminated) or bool(truncated)
                f.write(json.dumps(step_record(ep, state, action, reward, terminated,
                                               truncated, np.asarray(obs))) + "\n")
                obs = next_obs
    os.replace(tmp, path)
    return path


def record(path: str | Path, policy_fn, env, params, *, seed: int, episodes: int = 1,
           policy_params: Any = None, policy_name: str = "") -> Path:
    """Play `episodes` seeded episodes of `policy_fn(key, obs, params)` and write a replay."""
    return record_act(path, per_observation(policy_fn, policy_params), env, params, seed=seed,
                      episodes=episodes, policy_name=policy_name)


def bot_policies() -> dict:
    """The baseline bots (and random) as batched `act` functions, for `write_policy_replays`."""
    return {name: per_observation(fn)
            for name, fn in {**bots.BOTS, "random": bots.random_policy}.items()}


def write_policy_replays(run_dir: str | Path, policies: dict, env, params, *, seed: int,
                         episodes: int = 2) -> list[Path]:
    """Replays of the same `episodes` seeded episodes for each named policy, written to
    `<run_dir>/replays/<name>.jsonl`, so a viewer shows an agent and the bots side by side.

    `policies` maps a name to a batched `act(key, obs[N, D], mask[N, A]) -> actions[N]`, e.g.
    `{"ppo": lambda k, o, m: ppo.act(params, k, o, m, greedy=False), **bot_policies()}`.
    Episode i starts from `split(PRNGKey(seed), n)[i]`, the same as an evaluator with that seed.
    """
    out = Path(run_dir) / "replays"
    return [record_act(out / f"{name}.jsonl", act, env, params, seed=seed, episodes=episodes,
                       policy_name=name) for name, act in policies.items()]


def read(path: str | Path) -> tuple[dict, list[dict]]:
    """(header, steps) of a replay file; checks the format tag."""
    lines = Path(path).read_text().splitlines()
    if not lines:
        raise ValueError(f"{path}: empty replay file")
    header = json.loads(lines[0])
    check_header(header, path)
    return header, [json.loads(line) for line in lines[1:]]


def check_header(header, path) -> None:
    """Raise a ValueError a person can act on unless `header` is a FORMAT header."""
    fmt = header.get("format") if isinstance(header, dict) else None
    if fmt == FORMAT:
        return
    name, _, version = str(fmt).partition("/")
    ours, ours_version = FORMAT.split("/")
    if name == ours and version.isdigit() and int(version) > int(ours_version):
        raise ValueError(f"{path}: replay format {fmt} is newer than this jaxrl reads ({FORMAT}); "
                         "upgrade jaxrl to view it")
    raise ValueError(f"{path}: not a {FORMAT} file (header: {json.dumps(header)[:80]})")


def episode_returns(steps: list[dict]) -> list[float]:
    """Sum of rewards per episode, in episode order."""
    totals: dict[int, float] = {}
    for s in steps:
        totals[s["episode"]] = totals.get(s["episode"], 0.0) + s["reward"]
    return [totals[k] for k in sorted(totals)]
