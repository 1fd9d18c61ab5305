"""Actor-critic MLP for discrete-action RL, with action masking.

Separate actor and critic torsos (as in PureJaxRL): sharing one torso saves compute but lets
the value loss's scale pull on the policy features, which costs stability on small problems.
Orthogonal initialisation with a tiny last actor layer starts the policy near uniform.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Masked logits get this value rather than -inf: exp() underflows to exactly 0, and
# `p * log p` stays 0 instead of 0 * -inf = NaN in the entropy.
MASKED_LOGIT = -1e9

ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu}


def masked_logits(logits: jax.Array, action_mask: jax.Array | None) -> jax.Array:
    """Logits with invalid actions (mask False) pushed to MASKED_LOGIT; None means all valid."""
    if action_mask is None:
        return logits
    return jnp.where(action_mask, logits, MASKED_LOGIT)


class MLP(nnx.Module):
    """Hidden layers with an activation, then a linear head initialised at `head_scale`."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, *,
                 activation: str, head_scale: float, rngs: nnx.Rngs):
        orthogonal = nnx.initializers.orthogonal
        sizes = [in_features, *hidden]
        self.hidden = nnx.List([
            nnx.Linear(a, b, kernel_init=orthogonal(jnp.sqrt(2.0)), rngs=rngs)
            for a, b in zip(sizes[:-1], sizes[1:])
        ])
        self.head = nnx.Linear(sizes[-1], out_features, kernel_init=orthogonal(head_scale),
                               rngs=rngs)
        self.activation = ACTIVATIONS[activation]

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.hidden:
            x = self.activation(layer(x))
        return self.head(x)


class ActorCritic(nnx.Module):
    """`model(obs, action_mask) -> (logits[..., A], value[...])`; `model.value(obs)` alone."""

    def __init__(self, obs_dim: int, num_actions: int, *, hidden: Sequence[int] = (64, 64),
                 activation: str = "tanh", rngs: nnx.Rngs):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} unknown; choose one of "
                             f"{', '.join(ACTIVATIONS)}.")
        self.actor = MLP(obs_dim, hidden, num_actions, activation=activation, head_scale=0.01,
                         rngs=rngs)
        self.critic = MLP(obs_dim, hidden, 1, activation=activation, head_scale=1.0, rngs=rngs)

    def __call__(self, obs: jax.Array, action_mask: jax.Array | None = None):
        return masked_logits(self.actor(obs), action_mask), self.value(obs)

    def value(self, obs: jax.Array) -> jax.Array:
        return self.critic(obs)[..., 0]
