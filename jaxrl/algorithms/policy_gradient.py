"""Policy-gradient losses for language models on scored rollouts: pure functions, one update.

A `Rollout` (made on the host side by `jaxrl.envs.text.collector`) holds completions, the
log-probs the sampler gave them, reference-model log-probs and host rewards. `update` runs in
one jitted function (compiled by `jaxrl.core.step.compile_step`):

1. advantages from the *task* reward only, by a named estimator (`ADVANTAGES`);
2. `epochs x minibatches` optimizer steps over shuffled rows, each the gradient of a
   per-token loss (`LOSSES`) plus `kl_coef` times a per-token KL estimate to the reference
   (`KL_ESTIMATORS`), aggregated by `LOSS_AGGREGATIONS`, summed over `micro_batches`
   slices by a `lax.scan` accumulator (the same gradient as one pass, in less memory).

Ratios compare the policy with the sampler's own log-probs (`Rollout.logprobs`), scored under
the same temperature / top-k / top-p transform (`jaxrl.models.generate.token_logprobs`), so
the update trains the distribution that sampled. One `update` call is one train step
(`state.step` + 1) whatever the number of optimizer steps inside it.

Estimators: `rloo` (leave-one-out mean, unbiased), `grpo` (group mean, divided by the group
std), `dr_grpo` (group mean, no std: Liu et al. 2025; pair it with `seq-mean-token-sum-norm`),
`batch_mean`, `batch_norm` (batch mean and std), `moving_average` (an EMA of past batch
means, kept in the train state), `none`. A group (or batch) whose rewards tie teaches
nothing: its advantages are exactly 0, never a tie divided by a near-zero std.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxrl.core.config import ConfigError
from jaxrl.core.train_state import TrainState
from jaxrl.envs.text.collector import Rollout
from jaxrl.models.generate import token_logprobs

# Rewards within this (times 1 + |mean|) of each other count as tied: f32 rounding of a mean
# of equal rewards leaves ~1e-8, which divided by its own std would give +-1 advantages.
_TIE_TOLERANCE = 1e-6
# KL estimators clamp log(pi_ref / pi) here, as verl does: exp of a large ratio would swamp
# the loss. A token the policy's own top-k / top-p filter drops (log-prob below
# `_FILTERED`) has probability 0 under it and adds nothing to KL(pi || ref).
_MAX_LOG_RATIO = 20.0
_FILTERED = -1e30

GROUP_ESTIMATORS = ("rloo", "grpo", "dr_grpo")


@dataclasses.dataclass(frozen=True)
class PolicyGradientConfig:
    """How scored completions become gradient steps (sampling is `RolloutConfig`'s). Frozen:
    `update` can take it as a static argument."""

    advantage: Literal["rloo", "grpo", "dr_grpo", "batch_mean", "batch_norm", "moving_average",
                       "none"] = "rloo"
    loss: Literal["is_reinforce", "ppo_clip"] = "is_reinforce"
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                      "seq-mean-token-sum-norm"] = "seq-mean-token-sum"
    clip_eps: float = 0.2  # ppo_clip: ratios outside [1 - eps, 1 + eps] give no gradient
    epochs: int = 1  # passes over each rollout (ppo_clip reuses the stored sampler log-probs)
    minibatches: int = 1  # optimizer steps per epoch
    micro_batches: int = 1  # gradient-accumulation slices per minibatch (memory only)
    kl_coef: float = 0.05  # weight of the per-token KL term to the reference model
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    moving_average_decay: float = 0.9

    def validate(self):
        for name in ("epochs", "minibatches", "micro_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"reinforce.{name} must be >= 1, got {getattr(self, name)}.")
        if not 0.0 < self.clip_eps < 1.0:
            raise ConfigError(f"reinforce.clip_eps must be in (0, 1), got {self.clip_eps}.")
        if self.kl_coef < 0:
            raise ConfigError(f"reinforce.kl_coef must be >= 0, got {self.kl_coef}.")
        if not 0.0 <= self.moving_average_decay < 1.0:
            raise ConfigError(f"reinforce.moving_average_decay must be in [0, 1), got "
                              f"{self.moving_average_decay}.")

    def check_rollout(self, *, batch_size: int, group_size: int, temperature: float):
        """Reject sampling settings this update cannot learn from (ConfigError, with the fix)."""
        if temperature == 0.0:
            raise ConfigError("rollout.sampling.temperature=0 samples greedily: the completions "
                              "of a prompt are identical, so group advantages are all 0, and a "
                              "policy gradient needs a stochastic policy; use temperature > 0.")
        if self.advantage in GROUP_ESTIMATORS and group_size < 2:
            raise ConfigError(f"reinforce.advantage={self.advantage!r} compares completions of "
                              f"the same prompt, so rollout.group_size must be >= 2 (got "
                              f"{group_size}); raise it or use advantage: batch_mean.")
        if self.advantage == "batch_norm" and batch_size < 2:
            raise ConfigError("reinforce.advantage='batch_norm' needs a batch of >= 2 completions.")
        rows = self.minibatches * self.micro_batches
        if batch_size % rows:
            raise ConfigError(f"the batch of {batch_size} completions does not split into "
                              f"reinforce.minibatches x micro_batches = {rows} equal slices.")


@flax.struct.dataclass
class BaselineState:
    """The moving-average baseline; `count` = batches seen (0: take the first batch's mean)."""

    value: jax.Array
    count: jax.Array

    @classmethod
    def zero(cls) -> BaselineState:
        return cls(value=jnp.zeros((), jnp.float32), count=jnp.zeros((), jnp.int32))


def init_state(model: nnx.Module, optimizer: optax.GradientTransformation) -> TrainState:
    """The core `TrainState` with the moving-average baseline in `extra` (so it is checkpointed)."""
    state = TrainState.create(model, optimizer, extra={"baseline": BaselineState.zero()})
    if jax.tree.leaves(state.rest):
        raise ValueError("policy-gradient steps sample and score with `(graphdef, params)` alone, "
                         "but the model has non-parameter state; build it without stateful RNGs.")
    return state


# --------------------------------------------------------------------------------------------
# Advantages: rewards [B] (rows [i*G, (i+1)*G) share a prompt) -> (advantages, baselines) [B]


def _std_or_tie(centered: jax.Array, mean: jax.Array, axis) -> tuple[jax.Array, jax.Array]:
    std = jnp.sqrt(jnp.mean(jnp.square(centered), axis=axis, keepdims=True))
    return std, std <= _TIE_TOLERANCE * (1.0 + jnp.abs(mean))


def _grouped(fn: Callable) -> Callable:
    """Lift `fn(groups [N, G]) -> (advantages, baselines) [N, G]` to flat rows; tied groups -> 0."""
    def estimator(rewards, group_size, baseline):
        groups = rewards.reshape(-1, group_size)  # [N, G]
        advantages, values = fn(groups)
        mean = groups.mean(1, keepdims=True)
        _, tied = _std_or_tie(groups - mean, mean, axis=1)
        return jnp.where(tied, 0.0, advantages).reshape(-1), values.reshape(-1)
    return estimator


def _rloo(groups):
    others = (groups.sum(1, keepdims=True) - groups) / (groups.shape[1] - 1)
    return groups - others, others


def _group_mean(groups):
    mean = jnp.broadcast_to(groups.mean(1, keepdims=True), groups.shape)
    return groups - mean, mean


def _grpo(groups):
    centered, mean = _group_mean(groups)
    std, tied = _std_or_tie(centered, mean[:, :1], axis=1)
    return jnp.where(tied, 0.0, centered / jnp.where(tied, 1.0, std)), mean


def _batch_mean(rewards, group_size, baseline):
    values = jnp.full_like(rewards, rewards.mean())
    return rewards - values, values


def _batch_norm(rewards, group_size, baseline):
    centered, values = _batch_mean(rewards, group_size, baseline)
    std, tied = _std_or_tie(centered, values[0], axis=None)
    return jnp.where(tied, 0.0, centered / jnp.where(tied, 1.0, std)), values


def _moving_average(rewards, group_size, baseline):
    values = jnp.full_like(rewards, jnp.where(baseline.count > 0, baseline.value, rewards.mean()))
    return rewards - values, values


def _no_baseline(rewards, group_size, baseline):
    return rewards, jnp.zeros_like(rewards)


ADVANTAGES: dict[str, Callable] = {
    "rloo": _grouped(_rloo),
    "grpo": _grouped(_grpo),
    "dr_grpo": _grouped(_group_mean),
    "batch_mean": _batch_mean,
    "batch_norm": _batch_norm,
    "moving_average": _moving_average,
    "none": _no_baseline,
}


def compute_advantages(rewards: jax.Array, group_size: int, baseline: BaselineState,
                       cfg: PolicyGradientConfig) -> tuple[jax.Array, jax.Array, BaselineState]:
    """-> (advantages [B], baseline values [B], next moving-average state)."""
    advantages, values = ADVANTAGES[cfg.advantage](rewards, group_size, baseline)
    batch_mean = rewards.mean()
    previous = jnp.where(baseline.count > 0, baseline.value, batch_mean)
    decay = cfg.moving_average_decay
    next_baseline = BaselineState(value=decay * previous + (1 - decay) * batch_mean,
                                  count=baseline.count + 1)
    return advantages, values, next_baseline


# --------------------------------------------------------------------------------------------
# Per-token terms [B, T] and how they are averaged


def _log_ratio(logprobs, ref_logprobs):
    """log(pi_ref / pi) per token, clamped; 0 where the policy filtered the token out."""
    log_ratio = jnp.clip(ref_logprobs - logprobs, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return jnp.where(logprobs < _FILTERED, 0.0, log_ratio)


def kl_k1(logprobs, ref_logprobs):
    """log pi - log pi_ref: unbiased for KL(pi || ref), but its gradient is 0 in expectation."""
    return -_log_ratio(logprobs, ref_logprobs)


def kl_k2(logprobs, ref_logprobs):
    """(log pi - log pi_ref)^2 / 2: biased, but its gradient is the gradient of KL(pi || ref)."""
    return 0.5 * jnp.square(_log_ratio(logprobs, ref_logprobs))


def kl_k3(logprobs, ref_logprobs):
    """r - log r - 1 with r = pi_ref / pi: unbiased, never negative (GRPO's KL term)."""
    log_ratio = _log_ratio(logprobs, ref_logprobs)
    return jnp.exp(log_ratio) - log_ratio - 1.0


KL_ESTIMATORS: dict[str, Callable] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def is_reinforce(logprobs, sampler_logprobs, advantages, cfg):
    """-(pi / pi_sampler) * A per token (Tinker's importance-sampling loss); on-policy its
    gradient is REINFORCE's, -A * grad log pi."""
    ratio = jnp.exp(logprobs - sampler_logprobs)
    return -ratio * advantages, jnp.zeros_like(ratio)


def ppo_clip(logprobs, sampler_logprobs, advantages, cfg):
    """-min(r A, clip(r, 1 - eps, 1 + eps) A) per token; also says where clipping bit."""
    ratio = jnp.exp(logprobs - sampler_logprobs)
    clipped = jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
    unclipped_loss, clipped_loss = -ratio * advantages, -clipped * advantages
    clipped_bites = (clipped_loss > unclipped_loss).astype(jnp.float32)
    return jnp.maximum(unclipped_loss, clipped_loss), clipped_bites


LOSSES: dict[str, Callable] = {"is_reinforce": is_reinforce, "ppo_clip": ppo_clip}


# Token weights [B, T] from the response mask, so that sum(weights * loss) is the aggregate.
# They are computed over a whole minibatch before it is cut into micro-batches, so
# accumulating micro-batch sums gives exactly the minibatch's aggregate.
LOSS_AGGREGATIONS: dict[str, Callable] = {
    # every token counts the same (DAPO; TRL's default)
    "token-mean": lambda m: m / jnp.maximum(m.sum(), 1.0),
    # every completion counts the same, its tokens averaged (the GRPO paper)
    "seq-mean-token-mean": lambda m: m / (jnp.maximum(m.sum(-1, keepdims=True), 1.0) * m.shape[0]),
    # every completion's log-prob summed (classic REINFORCE)
    "seq-mean-token-sum": lambda m: m / m.shape[0],
    # Dr.GRPO: a constant normaliser (rows x row width), so no length bias
    "seq-mean-token-sum-norm": lambda m: m / (m.shape[0] * m.shape[1]),
}


def aggregate(token_values: jax.Array, response_mask: jax.Array, loss_agg: str) -> jax.Array:
    """`token_values` [B, T] reduced to a scalar by the named aggregation."""
    return jnp.sum(token_values * LOSS_AGGREGATIONS[loss_agg](response_mask.astype(jnp.float32)))


# --------------------------------------------------------------------------------------------
# The update


@flax.struct.dataclass
class _Rows:
    """One minibatch's rows, everything the loss reads; the leading axis is rows."""

    tokens: jax.Array
    mask: jax.Array
    weights: jax.Array  # [B, T] aggregation weights (0 off the response)
    sampler_logprobs: jax.Array
    ref_logprobs: jax.Array
    advantages: jax.Array  # [B, 1]


@flax.struct.dataclass
class _Optim:
    """The carry of the optimizer-step scan."""

    params: nnx.State
    opt_state: optax.OptState


def policy_loss(params, graphdef, rows: _Rows, cfg: PolicyGradientConfig, sampling: dict,
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted sum of (policy term + kl_coef * KL term) over these rows' tokens."""
    logprobs = token_logprobs(graphdef, params, rows.tokens, rows.mask, **sampling)
    pg, clipped = LOSSES[cfg.loss](logprobs, rows.sampler_logprobs, rows.advantages, cfg)
    kl = KL_ESTIMATORS[cfg.kl_estimator](logprobs, rows.ref_logprobs)
    per_token = pg + cfg.kl_coef * kl if cfg.kl_coef else pg
    response = (rows.weights > 0).astype(jnp.float32)
    stats = {"pg_loss": jnp.sum(pg * rows.weights), "kl_tokens": jnp.sum(kl * response),
             "clipped_tokens": jnp.sum(clipped * response), "tokens": jnp.sum(response)}
    return jnp.sum(per_token * rows.weights), stats


def _accumulated_grads(params, graphdef, rows: _Rows, cfg, sampling):
    """Loss and gradient of a minibatch, summed over `cfg.micro_batches` slices."""
    slices = jax.tree.map(lambda x: x.reshape(cfg.micro_batches, -1, *x.shape[1:]), rows)
    grad_fn = jax.value_and_grad(
        lambda p, micro: policy_loss(p, graphdef, micro, cfg, sampling), has_aux=True)

    def add(total, micro):
        return jax.tree.map(jnp.add, total, grad_fn(params, micro)), None

    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], slices))
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (loss, stats), grads = jax.lax.scan(add, zero, slices)[0]
    return loss, stats, grads


def update(state: TrainState, rollout: Rollout, key: jax.Array, *, cfg: PolicyGradientConfig,
           ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One train step on a scored rollout: `epochs x minibatches` optimizer steps (pure; jit
    it with `compile_step`, donating `state`)."""
    response = rollout.response_mask.astype(jnp.float32)
    batch = response.shape[0]
    sampling = rollout.sampling.kwargs()

    # -- advantages: the task reward only; the KL to the reference is its own loss term
    advantages, values, next_baseline = compute_advantages(
        rollout.rewards["reward"], rollout.group_size, state.extra["baseline"], cfg)

    # -- epochs x minibatches of shuffled rows
    rows_per_minibatch = batch // cfg.minibatches
    epoch_keys = jax.random.split(key, cfg.epochs)
    orders = jnp.stack([jax.random.permutation(k, batch) for k in epoch_keys])  # [epochs, B]
    orders = orders.reshape(cfg.epochs * cfg.minibatches, rows_per_minibatch)  # [steps, rows]

    def minibatch_rows(order):
        m = response[order]
        return _Rows(tokens=rollout.tokens[order], mask=rollout.mask[order],
                     weights=LOSS_AGGREGATIONS[cfg.loss_agg](m),
                     sampler_logprobs=rollout.logprobs[order],
                     ref_logprobs=rollout.ref_logprobs[order],
                     advantages=jax.lax.stop_gradient(advantages[order])[:, None])

    def optimizer_step(carry: _Optim, order):
        loss, stats, grads = _accumulated_grads(carry.params, state.graphdef, minibatch_rows(order),
                                                cfg, sampling)
        updates, opt_state = state.tx.update(grads, carry.opt_state, carry.params)
        params = optax.apply_updates(carry.params, updates)
        tokens = jnp.maximum(stats.pop("tokens"), 1.0)
        return _Optim(params, opt_state), {
            "loss": loss, "pg_loss": stats["pg_loss"], "grad_norm": optax.tree.norm(grads),
            "kl_loss": stats["kl_tokens"] / tokens,  # the KL estimator's per-token mean
            "clip_fraction": stats["clipped_tokens"] / tokens}

    final, per_step = jax.lax.scan(optimizer_step, _Optim(state.params, state.opt_state), orders)
    new_state = state.replace(step=state.step + 1, params=final.params, opt_state=final.opt_state,
                              extra={**state.extra, "baseline": next_baseline})

    # -- metrics, from the sampler's log-probs (no extra forward pass)
    tokens = jnp.maximum(response.sum(), 1.0)
    kl_k1_per_seq = jnp.sum(kl_k1(rollout.logprobs, rollout.ref_logprobs) * response, -1)
    metrics = {f"reward/{name}": value.mean() for name, value in rollout.rewards.items()
               if name != "reward"}
    metrics |= {
        "reward": rollout.rewards["reward"].mean(),
        "kl": kl_k1_per_seq.mean(),  # summed over each completion's tokens, then averaged
        # -log pi_sampler of the sampled tokens: an unbiased estimate of the sampling
        # distribution's per-token entropy.
        "entropy": -jnp.sum(rollout.logprobs * response) / tokens,
        "response_length": response.sum(-1).mean(),
        "baseline": values.mean(),
        "advantage_std": advantages.std(),
        **{name: value.mean() for name, value in per_step.items()},  # over optimizer steps
    }
    return new_state, metrics
