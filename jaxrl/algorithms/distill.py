"""On-policy distillation (Tinker-style): the student samples, the teacher scores the same
tokens, the per-token reverse KL is the signal. Pure functions, one update.

The collector (`jaxrl.envs.text.collector`) fills `Rollout.ref_logprobs` with the teacher's
log-probs of the student's sampled tokens (one teacher forward pass over prompt + completion,
shifted by one, at the sampling temperature). Per response token t:

    A_t = -coef * (log q_student(x_t) - log p_teacher(x_t))     (+ discounted future terms)
          + reward_coef * (group advantage of the env reward)   (optional mixing)

and the loss is importance-sampled REINFORCE, `-(q_theta / q_sampler) * A_t`, aggregated by
`policy_gradient.LOSS_AGGREGATIONS`. Minimising it lowers KL(q_student || p_teacher) along
the student's own samples: the student learns where it actually goes, unlike offline
distillation on teacher text.

A teacher with another tokenization scores different text than the student wrote, and the
signal is silently biased: `check_tokenization` refuses that before any training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from jaxrl.algorithms.policy_gradient import (
    GROUP_ESTIMATORS,
    LOSS_AGGREGATIONS,
    PolicyGradientConfig,
    compute_advantages,
    is_reinforce,
)
from jaxrl.core.config import ConfigError
from jaxrl.core.train_state import TrainState
from jaxrl.envs.text.collector import Rollout
from jaxrl.models.generate import token_logprobs


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """How the teacher's scores (and optionally the env reward) become a gradient step."""

    coef: float = 1.0  # weight of the per-token reverse-KL advantage
    discount: float = 0.0  # 0: each token's own term (Tinker's default); >0: plus later tokens'
    reward_coef: float = 0.0  # >0: add this times the env reward's group advantage
    advantage: Literal["rloo", "grpo", "dr_grpo", "batch_mean"] = "rloo"  # for the env reward
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                      "seq-mean-token-sum-norm"] = "token-mean"

    def validate(self):
        if self.coef < 0 or self.reward_coef < 0:
            raise ConfigError(f"distill.coef and distill.reward_coef must be >= 0, got "
                              f"{self.coef} and {self.reward_coef}.")
        if not 0.0 <= self.discount <= 1.0:
            raise ConfigError(f"distill.discount must be in [0, 1], got {self.discount}.")
        if self.coef == 0 and self.reward_coef == 0:
            raise ConfigError("distill.coef and distill.reward_coef are both 0: nothing to learn.")

    def check_rollout(self, *, group_size: int, temperature: float):
        if temperature == 0.0:
            raise ConfigError("rollout.sampling.temperature=0: on-policy distillation needs the "
                              "student's sampling distribution; use temperature > 0.")
        if self.reward_coef and self.advantage in GROUP_ESTIMATORS and group_size < 2:
            raise ConfigError(f"distill.reward_coef > 0 with advantage={self.advantage!r} needs "
                              f"rollout.group_size >= 2 (got {group_size}).")


def reverse_kl(logprobs: jax.Array, teacher_logprobs: jax.Array, response_mask: jax.Array):
    """Per-token log q(x_t) - log p(x_t) on the response, 0 elsewhere: a sample of
    KL(q || p) at each position (its sum over a completion estimates the sequence KL)."""
    return jnp.where(response_mask > 0, logprobs - teacher_logprobs, 0.0)


def discounted(values: jax.Array, response_mask: jax.Array, discount: float) -> jax.Array:
    """sum_{s >= t} discount^(s - t) * values_s along the response ([B, T]); 0: values."""
    if discount == 0.0:
        return values

    def back(later, column):
        value, mask = column
        total = value + discount * later * mask
        return total, total

    columns = (values.T[::-1], response_mask.astype(values.dtype).T[::-1])
    _, totals = jax.lax.scan(back, jnp.zeros(values.shape[0], values.dtype), columns)
    return totals[::-1].T * response_mask


def token_advantages(rollout: Rollout, cfg: DistillConfig, baseline) -> tuple[jax.Array, dict]:
    """A_t [B, T] (0 off the response), and the parts it was made of."""
    response = rollout.response_mask.astype(jnp.float32)
    kl = reverse_kl(rollout.logprobs, rollout.ref_logprobs, response)
    advantages = -cfg.coef * discounted(kl, response, cfg.discount)
    parts = {"kl": kl}
    if cfg.reward_coef:
        pg = PolicyGradientConfig(advantage=cfg.advantage)
        reward_adv, _, _ = compute_advantages(rollout.rewards["reward"], rollout.group_size,
                                              baseline, pg)
        advantages = advantages + cfg.reward_coef * reward_adv[:, None] * response
        parts["reward_advantage"] = reward_adv
    return advantages, parts


def distill_loss(params, graphdef, rollout: Rollout, advantages: jax.Array, cfg: DistillConfig):
    """The aggregated importance-sampled loss over the response tokens."""
    logprobs = token_logprobs(graphdef, params, rollout.tokens, rollout.mask,
                              **rollout.sampling.kwargs())
    per_token, _ = is_reinforce(logprobs, rollout.logprobs, jax.lax.stop_gradient(advantages), cfg)
    weights = LOSS_AGGREGATIONS[cfg.loss_agg](rollout.response_mask.astype(jnp.float32))
    return jnp.sum(per_token * weights)


def update(state: TrainState, rollout: Rollout, key: jax.Array, *, cfg: DistillConfig,
           ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a rollout the teacher scored (pure; jit it with `compile_step`)."""
    del key  # one pass over the rows, in order: nothing random
    response = rollout.response_mask.astype(jnp.float32)
    advantages, parts = token_advantages(rollout, cfg, state.extra["baseline"])
    loss, grads = jax.value_and_grad(distill_loss)(state.params, state.graphdef, rollout,
                                                   advantages, cfg)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    tokens = jnp.maximum(response.sum(), 1.0)
    metrics = {f"reward/{name}": value.mean() for name, value in rollout.rewards.items()
               if name != "reward"}
    metrics |= {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "reward": rollout.rewards["reward"].mean(),
        # the reverse KL to the teacher: summed over each completion, then averaged ...
        "kl": parts["kl"].sum(-1).mean(),
        "kl_per_token": parts["kl"].sum() / tokens,  # ... and per token
        "advantage_mean": (advantages * response).sum() / tokens,
        "entropy": -jnp.sum(rollout.logprobs * response) / tokens,
        "response_length": response.sum(-1).mean(),
    }
    return new_state, metrics


def check_tokenization(student: object, teacher: object, texts: Sequence[str], *,
                       student_vocab: int, teacher_vocab: int, limit: int = 64) -> None:
    """Refuse a teacher that would score other tokens than the student sampled.

    The teacher scores the student's token ids, so both must map the same text to the same
    ids: same vocabulary size, same end-of-text id, identical encodings of `texts` (the
    env's prompts and reference answers).
    """
    if student_vocab != teacher_vocab:
        raise ConfigError(f"the teacher's vocabulary has {teacher_vocab} entries, the student's "
                          f"{student_vocab}: it would score other tokens than the student "
                          "sampled. Use a teacher trained with the student's tokenizer.")
    if student.eot_id != teacher.eot_id:
        raise ConfigError(f"teacher end-of-text id {teacher.eot_id} != student's {student.eot_id}; "
                          "use one tokenizer for both.")
    for text in list(texts)[:limit]:
        a, b = student.encode(text), teacher.encode(text)
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise ConfigError(f"student and teacher tokenize the same text differently (first at "
                              f"token {at}: {a[at:at + 3]} vs {b[at:at + 3]}, in {text[:60]!r}); "
                              "on-policy distillation needs one tokenizer for both.")

