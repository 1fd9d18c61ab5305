"""Functional, gymnax-style environments behind one factory: `make(name, **kw) -> (env, params)`.

Every env returned here keeps one contract, so algorithms never special-case an env:

    obs, state = env.reset(key, params)
    obs, state, reward, terminated, truncated, info = env.step(key, state, action, params)

`step` auto-resets: when `terminated | truncated`, the returned `obs`/`state` already belong to
the next episode and `info["final_observation"]` holds the last observation of the finished one
(needed to bootstrap the value through a truncation). `terminated` means the episode ended in
the game (no bootstrap); `truncated` means only the time limit ended it. Rewards are float32,
flags bool. Attributes: `env.default_params`, `env.num_actions`, `env.observation_shape`,
optionally `env.action_spec` (an `ActionSpec`; without one the actions are `num_actions`
categories) and (Prospector only) `env.action_mask(state, params) -> bool[num_actions]`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl.core.config import ConfigError

__all__ = ["make", "ActionSpec", "GymnaxEnv", "action_spec", "registered_envs"]


@dataclasses.dataclass(frozen=True)
class ActionSpec:
    """What a policy must emit: one of `n` categories, or a float array of `shape` (bounds
    `low`/`high`, flattened, possibly infinite)."""

    n: int | None = None
    shape: tuple[int, ...] = ()
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()

    @property
    def continuous(self) -> bool:
        return self.n is None

    @property
    def size(self) -> int:
        """Policy outputs: categories, or entries of the action array."""
        return int(np.prod(self.shape)) if self.continuous else self.n


def action_spec(env) -> ActionSpec:
    """The env's `ActionSpec`; envs without one (Prospector) have `num_actions` categories."""
    spec = getattr(env, "action_spec", None)
    return spec if spec is not None else ActionSpec(n=int(env.num_actions))


def gymnax_action_spec(space, env_name: str) -> ActionSpec:
    """Discrete -> categories, Box -> a float vector; any other space is refused, because
    training a policy that does not match the space reports returns while learning nothing."""
    from gymnax.environments import spaces

    if isinstance(space, spaces.Discrete):
        return ActionSpec(n=int(space.n))
    if isinstance(space, spaces.Box) and jnp.issubdtype(space.dtype, jnp.floating):
        shape = tuple(int(d) for d in space.shape)
        bound = lambda b: tuple(float(x) for x in np.broadcast_to(np.asarray(b), shape).ravel())  # noqa: E731
        return ActionSpec(shape=shape, low=bound(space.low), high=bound(space.high))
    raise ConfigError(
        f"env {env_name!r} has action space {space!r}; jaxrl's policies serve Discrete "
        "(categorical) and float Box (Gaussian) action spaces only.")


class GymnaxEnv:
    """A gymnax environment adapted to the jaxrl 6-tuple contract.

    gymnax >= 1.0 already separates termination from truncation; this wrapper pins the dtypes,
    exposes `num_actions`/`observation_shape`/`action_spec` as plain attributes and makes `info`
    carry the same keys as Prospector, so PPO code is identical for both. An action space no
    policy here can serve (Tuple, Dict, integer Box) is a ConfigError at construction.
    """

    def __init__(self, env, params):
        self._env = env
        self.default_params = params
        self.name = env.name
        self.num_actions = int(env.num_actions)
        self.observation_shape = tuple(env.observation_space(params).shape)
        self.action_spec = gymnax_action_spec(env.action_space(params), env.name)

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
