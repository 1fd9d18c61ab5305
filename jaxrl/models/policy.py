"""Actor-critic MLP for discrete (masked categorical) and continuous (Gaussian) actions.

Separate actor and critic torsos (as in PureJaxRL): sharing one torso saves compute but lets
the value loss's scale pull on the policy features, which costs stability on small problems.
Orthogonal initialisation with a tiny last actor layer starts the policy near uniform (or near
a zero-mean Gaussian). The Gaussian's log-std is one state-independent parameter per action
dimension, started at 0 (std 1), as in CleanRL's ppo_continuous_action.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

# Masked logits get this value rather than -inf: exp() underflows to exactly 0, and
# `p * log p` stays 0 instead of 0 * -inf = NaN in the entropy.
MASKED_LOGIT = -1e9

ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu}


def masked_logits(logits: jax.Array, action_mask: jax.Array | None) -> jax.Array:
    """Logits with invalid actions (mask False) pushed to MASKED_LOGIT; None means all valid."""
    if action_mask is None:
        return logits
    return jnp.where(action_mask, logits, MASKED_LOGIT)


class Categorical(struct.PyTreeNode):
    """Distribution over `logits.shape[-1]` actions (masked ones already at MASKED_LOGIT)."""

    logits: jax.Array

    def noise(self, key: jax.Array) -> jax.Array:
        """The Gumbel noise `sample_from` adds; reads only `logits`' shape and dtype, so an
        abstract distribution (`jax.eval_shape`) draws it too."""
        return jax.random.gumbel(key, self.logits.shape, self.logits.dtype)

    def sample_from(self, noise: jax.Array) -> jax.Array:
        return jnp.argmax(self.logits + noise, -1)

    def sample(self, key: jax.Array) -> jax.Array:
        """`jax.random.categorical(key, logits)`, the same draw."""
        return self.sample_from(self.noise(key))

    def mode(self) -> jax.Array:
        return jnp.argmax(self.logits, -1)

    def log_prob(self, action: jax.Array) -> jax.Array:
        log_probs = jax.nn.log_softmax(self.logits)
        return jnp.take_along_axis(log_probs, action[..., None], -1)[..., 0]

    def entropy(self) -> jax.Array:
        log_probs = jax.nn.log_softmax(self.logits)
        return -jnp.sum(jnp.exp(log_probs) * log_probs, -1)


class Gaussian(struct.PyTreeNode):
    """Diagonal Gaussian over the last axis. Samples are unbounded: the env clips them, and
    log-probs are of the unclipped sample (CleanRL's convention)."""

    mean: jax.Array
    log_std: jax.Array  # broadcasts against mean

    def noise(self, key: jax.Array) -> jax.Array:
        """Standard normal noise of `mean`'s shape (abstract distributions draw it too)."""
        return jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def sample_from(self, noise: jax.Array) -> jax.Array:
        return self.mean + jnp.exp(self.log_std) * noise

    def sample(self, key: jax.Array) -> jax.Array:
        return self.sample_from(self.noise(key))

    def mode(self) -> jax.Array:
        return self.mean

    def log_prob(self, action: jax.Array) -> jax.Array:
        z = (action - self.mean) * jnp.exp(-self.log_std)
        return jnp.sum(-0.5 * jnp.square(z) - self.log_std - 0.5 * math.log(2 * math.pi), -1)

    def entropy(self) -> jax.Array:
        log_std = jnp.broadcast_to(self.log_std, self.mean.shape)
        return jnp.sum(log_std + 0.5 * (1.0 + math.log(2 * math.pi)), -1)


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
    """`model(obs, action_mask) -> (Categorical | Gaussian, value[...])`; `model.value(obs)`.

    `num_actions` is the number of categories, or with `continuous=True` the action vector's
    size (masks apply to categorical policies only).
    """

    def __init__(self, obs_dim: int, num_actions: int, *, continuous: bool = False,
                 hidden: Sequence[int] = (64, 64), activation: str = "tanh", rngs: nnx.Rngs):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} unknown; choose one of "
                             f"{', '.join(ACTIVATIONS)}.")
        self.actor = MLP(obs_dim, hidden, num_actions, activation=activation, head_scale=0.01,
                         rngs=rngs)
        self.critic = MLP(obs_dim, hidden, 1, activation=activation, head_scale=1.0, rngs=rngs)
        self.log_std = nnx.Param(jnp.zeros(num_actions)) if continuous else None

    def __call__(self, obs: jax.Array, action_mask: jax.Array | None = None):
        out = self.actor(obs)
        if self.log_std is None:
            dist = Categorical(masked_logits(out, action_mask))
        else:
            dist = Gaussian(out, self.log_std[...])
        return dist, self.value(obs)

    def value(self, obs: jax.Array) -> jax.Array:
        return self.critic(obs)[..., 0]
