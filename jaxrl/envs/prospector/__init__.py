"""Prospector: a partially observed asteroid-mining game with a JAX core and a C++ core.

`make(env_impl="auto", **overrides) -> (env, params)`. Both cores share one integer state
layout (`ProspectorState`), one counter-based RNG and one observation function, so a seed gives
the same trajectory bit for bit in either; rules and every obs slot: docs/prospector.md.

env_impl: "jax" runs anywhere (CPU, GPU, TPU) and can be fused into the learner's jit;
"native" runs the C++ core on the CPU backend through an XLA FFI custom call; "auto" picks
native when the default backend is CPU and the core is built, else jax. `env.impl` records the
choice. On TPU/GPU, auto picks jax: the native core is CPU-only.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

from jaxrl.envs.prospector import jax_env, native
from jaxrl.envs.prospector import spec as S
from jaxrl.envs.prospector.jax_env import ProspectorState
from jaxrl.envs.prospector.spec import N_ACTIONS, OBS_DIM

__all__ = ["Prospector", "ProspectorParams", "ProspectorState", "make", "OBS_DIM", "N_ACTIONS",
           "resolve_impl"]

EnvImpl = Literal["jax", "native", "auto"]


@struct.dataclass
class ProspectorParams:
    """Static rule knobs (hashable, so jit specialises on them and the C++ core gets them as
    FFI attributes). Credits are integers; the reward is credits * 0.01."""

    max_steps: int = struct.field(pytree_node=False, default=S.MAX_STEPS)
    invalid_penalty: int = struct.field(pytree_node=False, default=S.INVALID_PENALTY)
    loss_penalty: int = struct.field(pytree_node=False, default=S.LOSS_PENALTY)


def resolve_impl(env_impl: str) -> str:
    """"auto" -> "native" on a CPU backend when the C++ core loaded, else "jax"."""
    if env_impl not in ("jax", "native", "auto"):
        raise ValueError(f"env_impl must be 'jax', 'native' or 'auto', got {env_impl!r}")
    if env_impl == "auto":
        return "native" if jax.default_backend() == "cpu" and native.available() else "jax"
    if env_impl == "native":
        native.require()
    return env_impl


class Prospector:
    """Gymnax-style functional env. `step` ignores its key: randomness comes from the per-env
    counter RNG seeded at `reset(key)`, which is what keeps the two cores identical."""

    num_actions = N_ACTIONS
    observation_shape = (OBS_DIM,)
    name = "prospector"

    def __init__(self, impl: EnvImpl = "auto"):
        self.impl = resolve_impl(impl)

    @property
    def default_params(self) -> ProspectorParams:
        return ProspectorParams()

    def reset(self, key: jax.Array, params: ProspectorParams | None = None):
        params = params or self.default_params
        seed = jax_env.seed_from_key(key)
        if self.impl == "native":
            state, obs = native.reset_many(seed, params.max_steps)
            return obs, state
        state = jax_env.reset_core(seed)
        return jax_env.observe(state, params.max_steps), state

    def step(self, key: jax.Array, state: ProspectorState, action: jax.Array,
             params: ProspectorParams | None = None):
        del key  # see class docstring
        params = params or self.default_params
        if self.impl == "native":
            state, obs, reward, terminated, truncated, final_obs = native.step_many(
                state, action, max_steps=params.max_steps,
                invalid_penalty=params.invalid_penalty, loss_penalty=params.loss_penalty)
        else:
            state, obs, reward, terminated, truncated, final_obs = self._jax_step(
                state, action, params)
        info = {"final_observation": final_obs, "terminated": terminated, "truncated": truncated}
        return obs, state, reward, terminated, truncated, info

    @staticmethod
    def _jax_step(state, action, params):
        action = jnp.asarray(action)
        if not jnp.issubdtype(action.dtype, jnp.integer):
            raise TypeError(f"prospector: actions must be integer indices, got {action.dtype}")
        stepped, reward, terminated, truncated = jax_env.step_core(
            state, action, params.max_steps, params.invalid_penalty, params.loss_penalty)
        final_obs = jax_env.observe(stepped, params.max_steps)
        done = terminated | truncated
        fresh = jax_env.next_episode(stepped)
        state = jax.tree.map(lambda f, s: jnp.where(done, f, s), fresh, stepped)
        obs = jnp.where(done, jax_env.observe(fresh, params.max_steps), final_obs)
        return state, obs, reward, terminated, truncated, final_obs

    def action_mask(self, state: ProspectorState, params: ProspectorParams | None = None):
        """bool[69] (leading dims follow the state's) of actions that are not a no-op."""
        mask = jax_env.action_mask
        for _ in range(state.ship.ndim - 1):
            mask = jax.vmap(mask)
        return mask(state)

    def __repr__(self) -> str:
        return f"Prospector(impl={self.impl!r})"


def make(env_impl: EnvImpl = "auto", **overrides) -> tuple[Prospector, ProspectorParams]:
    """(env, params); `overrides` are ProspectorParams fields (max_steps=..., ...)."""
    fields = set(ProspectorParams.__dataclass_fields__)
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown Prospector option(s) {sorted(unknown)}; valid: {sorted(fields)}"
                         " and env_impl")
    return Prospector(env_impl), ProspectorParams(**overrides)
