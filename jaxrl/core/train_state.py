"""TrainState: the pytree a gradient-based step function carries.

The NNX model enters as `nnx.split(model, nnx.Param, ...)`: `graphdef` is static, `params`
are differentiated and optimised, `rest` holds any other model state (e.g. RNG counters).
`extra` is for algorithm state (baselines, PID integrals) so it is checkpointed with the rest.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any
    extra: Any = struct.field(default_factory=dict)
    graphdef: Any = struct.field(pytree_node=False, default=None)
    tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, model: nnx.Module, tx: optax.GradientTransformation, extra=None):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return cls(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                   opt_state=tx.init(params), extra=extra or {}, graphdef=graphdef, tx=tx)

    def model(self, params=None) -> nnx.Module:
        """A fresh module view of (params, rest); safe inside jit and grad."""
        return nnx.merge(self.graphdef, self.params if params is None else params, self.rest,
                         copy=True)

    def apply_gradients(self, grads, **changes) -> "TrainState":
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)
