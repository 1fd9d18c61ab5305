"""PID-Lagrangian multiplier for a cost constraint J_C <= B (Stooke, Achiam & Abbeel 2020).

The non-incremental form of rlpyt's `CppoPID`: lambda is a function of the current error, its
clamped integral and a delayed cost derivative, recomputed from scratch each update. The
incremental form (`lambda += K_P e + K_I sum(e) + ...`) integrates P and I a second time and
oscillates; it is not offered. Anti-windup: the integral is projected onto [0, I_max], so a
long stretch under budget cannot bank credit that later lets cost overshoot.

The error is relative, e = (J_C - B) / B, so one set of gains serves every budget: an
absolute error makes B = 0.125 respond 16x slower than B = 2 (with the absolute form and
kp 0.5, ki 0.05, a B = 0.5 policy was still 60% over budget after 30 updates).

Pure functions of a `PIDState` pytree, updated once per PPO iteration; the state lives in the
train state and so in every checkpoint.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxrl.core.config import ConfigError


@dataclasses.dataclass
class PIDConfig:
    """Gains (per unit of relative error) and smoothing; `budget` is the target mean cost per
    decision (extra forward-equivalents)."""

    budget: float = 1.0
    kp: float = 2.0
    ki: float = 0.5
    kd: float = 0.0
    alpha_p: float = 0.5  # EMA of the proportional error
    alpha_d: float = 0.95  # EMA of the cost the derivative reads
    d_delay: int = 10  # derivative over this many updates
    lambda_init: float = 0.0
    lambda_max: float = 100.0
    integral_max: float = 100.0

    def validate(self):
        if self.budget <= 0:
            raise ConfigError(f"pid.budget must be > 0, got {self.budget}.")
        for name in ("kp", "ki", "kd", "lambda_init"):
            if getattr(self, name) < 0:
                raise ConfigError(f"pid.{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("alpha_p", "alpha_d"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"pid.{name} must be in [0, 1), got {getattr(self, name)}.")
        if self.d_delay < 1:
            raise ConfigError(f"pid.d_delay must be >= 1, got {self.d_delay}.")
        if self.lambda_max <= 0 or self.integral_max <= 0:
            raise ConfigError("pid.lambda_max and pid.integral_max must be > 0.")


class PIDState(struct.PyTreeNode):
    integral: jax.Array  # I, in [0, integral_max]
    p_ema: jax.Array  # P: EMA of (J_C - B) / B
    cost_ema: jax.Array  # Cd: EMA of J_C
    cost_history: jax.Array  # [d_delay] past Cd, oldest first
    penalty: jax.Array  # lambda after the last update


def init(cfg: PIDConfig) -> PIDState:
    # I starts at lambda_init so that lambda(0 error) = lambda_init, as rlpyt's pid_i does.
    z = jnp.zeros((), jnp.float32)
    return PIDState(integral=z + cfg.lambda_init, p_ema=z, cost_ema=z,
                    cost_history=jnp.zeros((cfg.d_delay,), jnp.float32),
                    penalty=z + cfg.lambda_init)


def update(state: PIDState, cost: jax.Array, cfg: PIDConfig) -> PIDState:
    """Fold in this iteration's measured mean cost J_C -> the new state (its `penalty` is lambda)."""
    cost = jnp.asarray(cost, jnp.float32)
    error = (cost - cfg.budget) / cfg.budget
    integral = jnp.clip(state.integral + cfg.ki * error, 0.0, cfg.integral_max)
    p_ema = cfg.alpha_p * state.p_ema + (1.0 - cfg.alpha_p) * error
    cost_ema = cfg.alpha_d * state.cost_ema + (1.0 - cfg.alpha_d) * cost
    derivative = jnp.maximum(0.0, cost_ema - state.cost_history[0]) / cfg.budget
    penalty = jnp.clip(cfg.kp * p_ema + integral + cfg.kd * derivative, 0.0, cfg.lambda_max)
    history = jnp.concatenate([state.cost_history[1:], cost_ema[None]])
    return PIDState(integral=integral, p_ema=p_ema, cost_ema=cost_ema, cost_history=history,
                    penalty=penalty)
