"""Whole episodes side by side under any policy: the one episode loop evaluators share."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def play_episodes(env, env_params, act: Callable, reset_keys: jax.Array, step_keys: jax.Array):
    """One episode per reset key, for `len(step_keys)` steps; -> (returns, running, lengths).

    `act(key, obs[N, ...], action_mask[N, A] | None) -> actions[N]`. Rewards after an episode
    ends are not counted (auto-reset starts a new one), and `running` marks episodes still going
    when the steps ran out. The same `reset_keys` give two policies the same episodes.
    """
    num_episodes = reset_keys.shape[0]
    obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(reset_keys, env_params)
    mask_fn = getattr(env, "action_mask", None)
    step = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    def body(carry, key):
        obs, env_state, total, running, length = carry
        act_key, env_key = jax.random.split(key)
        mask = None if mask_fn is None else jax.vmap(mask_fn, in_axes=(0, None))(env_state,
                                                                                 env_params)
        action = act(act_key, obs, mask)
        obs, env_state, reward, terminated, truncated, _ = step(
            jax.random.split(env_key, num_episodes), env_state, action, env_params)
        total = total + jnp.where(running, reward, 0.0)
        length = length + running
        running = running & ~(terminated | truncated)
        return (obs, env_state, total, running, length), None

    init = (obs, env_state, jnp.zeros(num_episodes), jnp.ones(num_episodes, bool),
            jnp.zeros(num_episodes, jnp.int32))
    (_, _, total, running, length), _ = jax.lax.scan(body, init, step_keys)
    return total, running, length
