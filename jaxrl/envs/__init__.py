"""Functional, gymnax-style environments behind one factory: `make(name, **kw) -> (env, params)`.

Every env returned here keeps one contract, so algorithms never special-case an env:

    obs, state = env.reset(key, params)
    obs, state, reward, terminated, truncated, info = env.step(key, state, action, params)

`step` auto-resets: when `terminated | truncated`, the returned `obs`/`state` already belong to
the next episode and `info["final_observation"]` holds the last observation of the finished one
(needed to bootstrap the value through a truncation). `terminated` means the episode ended in
the game (no bootstrap); `truncated` means only the time limit ended it. Rewards are float32,
flags bool. Attributes: `env.default_params`, `env.num_actions`, `env.observation_shape`, and
(Prospector only) `env.action_mask(state, params) -> bool[num_actions]`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["make", "GymnaxEnv", "registered_envs"]


class GymnaxEnv:
    """A gymnax environment adapted to the jaxrl 6-tuple contract.

    gymnax >= 1.0 already separates termination from truncation; this wrapper pins the dtypes,
    exposes `num_actions`/`observation_shape` as plain attributes and makes `info` carry the same
    keys as Prospector, so PPO code is identical for both.
    """

    def __init__(self, env, params):
        self._env = env
        self.default_params = params
        self.name = env.name
        self.num_actions = int(env.num_actions)
        self.observation_shape = tuple(env.observation_space(params).shape)

    def reset(self, key: jax.Array, params=None):
        params = self.default_params if params is None else params
        obs, state = self._env.reset(key, params)
        return obs.astype(jnp.float32), state

    def step(self, key: jax.Array, state, action: jax.Array, params=None):
        params = self.default_params if params is None else params
        obs, state, reward, terminated, truncated, info = self._env.step(key, state, action, params)
        info = {
            "final_observation": info["final_observation"].astype(jnp.float32),
            "terminated": jnp.asarray(terminated, bool),
            "truncated": jnp.asarray(truncated, bool),
        }
        return (
            obs.astype(jnp.float32),
            state,
            jnp.asarray(reward, jnp.float32),
            jnp.asarray(terminated, bool),
            jnp.asarray(truncated, bool),
            info,
        )

    def __repr__(self) -> str:
        return f"GymnaxEnv({self.name!r})"


def registered_envs() -> list[str]:
    """All names `make` accepts."""
    import gymnax

    return ["prospector", *gymnax.registered_envs]


def make(name: str, **kwargs: Any):
    """Build an environment and its default params by name.

    "prospector" accepts `env_impl="jax"|"native"|"auto"` (see `jaxrl.envs.prospector.make`)
    and any `ProspectorParams` field as a keyword override. Gymnax names ("CartPole-v1", ...)
    forward keywords to `gymnax.make`.
    """
    if name.lower() == "prospector":
        from jaxrl.envs import prospector

        return prospector.make(**kwargs)

    import gymnax

    if name not in gymnax.registered_envs:
        raise ValueError(
            f"unknown environment {name!r}; choose one of {registered_envs()}"
        )
    env, params = gymnax.make(name, **kwargs)
    wrapped = GymnaxEnv(env, params)
    return wrapped, params
