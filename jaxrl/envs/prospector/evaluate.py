"""Seeded evaluation: play `num_episodes` episodes of any policy, get one return per episode.

A policy is `policy_fn(key, obs[260], params) -> int action` for ONE observation; it is vmapped
over the episodes, which all run side by side in one jitted `lax.scan`. Episode i always starts
from `reset(split(PRNGKey(seed), num_episodes)[i])`, so two policies evaluated with the same
seed face the same asteroid belts and the same random draws at every step (the env's RNG is
keyed by (episode seed, step, draw index), never by the actions taken).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import numpy as np

from jaxrl.envs.rollout import play_episodes

Policy = Callable[[jax.Array, jax.Array, Any], jax.Array]


def episode_keys(seed: int, num_episodes: int) -> jax.Array:
    return jax.random.split(jax.random.PRNGKey(seed), num_episodes)


@partial(jax.jit, static_argnames=("policy_fn", "env", "num_steps"))
def _play(policy_fn, env, env_params, policy_params, reset_keys, num_steps):
    per_obs = jax.vmap(policy_fn, in_axes=(0, 0, None))
    act = lambda key, obs, mask: per_obs(jax.random.split(key, obs.shape[0]), obs,  # noqa: E731
                                         policy_params)
    step_keys = jax.random.split(jax.random.fold_in(reset_keys[0], 1), num_steps)
    return play_episodes(env, env_params, act, reset_keys, step_keys)


def evaluate_policy(policy_fn: Policy, env, params, num_episodes: int, seed: int, *,
                    policy_params: Any = None, return_lengths: bool = False):
    """Per-episode returns (np.float32[num_episodes]) of `policy_fn` on `env` with `params`.

    `params` are the env params. `policy_params` (e.g. a network's weights) are passed to every
    policy call. Runs for the env's time limit; an episode that has not ended by then raises.
    """
    num_steps = int(getattr(params, "max_steps", getattr(params, "max_steps_in_episode", 0)))
    if num_steps <= 0:
        raise ValueError("evaluate_policy needs env params with max_steps (the time limit)")
    ret, alive, length = _play(policy_fn, env, params, policy_params,
                               episode_keys(seed, num_episodes), num_steps)
    if bool(alive.any()):
        raise RuntimeError("some episodes did not end within the time limit")
    ret = np.asarray(ret, np.float32)
    return (ret, np.asarray(length)) if return_lengths else ret


def summarize(returns: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(np.mean(returns)),
        "median": float(np.median(returns)),
        "std": float(np.std(returns)),
        "min": float(np.min(returns)),
        "max": float(np.max(returns)),
        "episodes": int(len(returns)),
    }
