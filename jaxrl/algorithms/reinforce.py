"""REINFORCE with a baseline for language models, on a text environment with a host reward.

One training step has two halves:

1. `collect` (host-driven): prompts for this step from the `TextEnv`, completions from the
   jitted `generate` with the *current* params, reference-model logprobs (jitted
   `token_logprobs`), then the reward on the host. The result is a `Rollout` pytree.
2. `update` (one pure jitted function): policy logprobs through `token_logprobs` (the same
   numerics as every training loss), the KL penalty to the reference, advantages from the
   chosen baseline, the policy-gradient loss and one optimizer step.

`make_train_step` composes both into `step(state, batch, key) -> (state, metrics)` for the
core loop (`batch` is None: the rollout is made inside, from `state.params`, so a resumed run
samples with the restored params and the prompts of its restored step).

Baselines (`ReinforceConfig.baseline`), on the total reward r of each completion:
- `moving_average`: an exponential average of past batch means, kept in the train state;
- `batch_mean`: the mean reward of this batch;
- `group_mean`: the mean over the `group_size` completions of the same prompt (GRPO);
- `leave_one_out`: the mean over the *other* completions of the same prompt (RLOO), which
  keeps the estimator unbiased: b_i = (sum_j r_j - r_i) / (G - 1).
`normalize: group` divides by the group's reward std (GRPO-style), `batch` by the batch's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrl.core.config import ConfigError
from jaxrl.core.train_state import TrainState
from jaxrl.envs.text import TextEnv
from jaxrl.models.generate import generate, token_logprobs

_STD_EPS = 1e-6


@dataclasses.dataclass
class ReinforceConfig:
    """How completions are sampled and turned into a policy gradient."""

    prompts_per_step: int = 8
    group_size: int = 4  # completions sampled per prompt; batch = prompts_per_step * group_size
    baseline: Literal["none", "moving_average", "batch_mean", "group_mean", "leave_one_out"] = "leave_one_out"
    normalize: Literal["none", "group", "batch"] = "none"
    moving_average_decay: float = 0.9
    kl_coef: float = 0.05  # reward -= kl_coef * sum_t (log pi - log pi_ref) over the completion
    max_new_tokens: int = 48
    temperature: float = 1.0  # 1.0 with no top-k/top-p samples from the policy itself (on-policy)
    top_k: int = 0
    top_p: float = 1.0
    entropy_floor: float = 0.0  # warn when per-token entropy falls below this (0 = off)
    kl_ceiling: float = 0.0  # warn when KL to the reference rises above this (0 = off)

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.group_size

    def validate(self):
        for name in ("prompts_per_step", "group_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"reinforce.{name} must be >= 1, got {getattr(self, name)}.")
        needs_group = self.baseline in ("group_mean", "leave_one_out") or self.normalize == "group"
        if needs_group and self.group_size < 2:
            raise ConfigError(
                f"reinforce.baseline={self.baseline!r} / normalize={self.normalize!r} compare "
                f"completions of the same prompt, so group_size must be >= 2 (got "
                f"{self.group_size}); raise group_size or use baseline: batch_mean.")
        if not 0.0 <= self.moving_average_decay < 1.0:
            raise ConfigError(f"reinforce.moving_average_decay must be in [0, 1), got "
                              f"{self.moving_average_decay}.")
        for name in ("kl_coef", "temperature", "entropy_floor", "kl_ceiling"):
            if getattr(self, name) < 0:
                raise ConfigError(f"reinforce.{name} must be >= 0, got {getattr(self, name)}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"reinforce.top_p must be in (0, 1], got {self.top_p}.")


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
        raise ValueError("REINFORCE samples and scores with `(graphdef, params)` alone, but the "
                         "model has non-parameter state; build it without stateful RNGs.")
    return state


@flax.struct.dataclass
class Rollout:
    """Scored completions, prompt included; token arrays are [B, P + max_new_tokens]."""

    tokens: jax.Array
    mask: jax.Array  # 1 on real tokens (prompt and completion)
    response_mask: jax.Array  # 1 on generated tokens, up to and including end-of-text
    ref_logprobs: jax.Array  # reference-model log p(token), 0 off the response
    rewards: dict[str, jax.Array]  # [B] each: host reward components and their total "reward"


# --------------------------------------------------------------------------------------------
# Pure functions: advantages, loss, update


def compute_advantages(rewards: jax.Array, baseline: BaselineState, cfg: ReinforceConfig,
                       ) -> tuple[jax.Array, jax.Array, BaselineState]:
    """-> (advantages [B], baseline values [B], next moving-average state).

    Rows are grouped by prompt: rows [i*G, (i+1)*G) share a prompt (G = cfg.group_size).
    """
    groups = rewards.reshape(-1, cfg.group_size)
    batch_mean = rewards.mean()
    if cfg.baseline == "none":
        values = jnp.zeros_like(rewards)
    elif cfg.baseline == "moving_average":
        current = jnp.where(baseline.count > 0, baseline.value, batch_mean)
        values = jnp.full_like(rewards, current)
    elif cfg.baseline == "batch_mean":
        values = jnp.full_like(rewards, batch_mean)
    elif cfg.baseline == "group_mean":
        values = jnp.broadcast_to(groups.mean(1, keepdims=True), groups.shape).reshape(-1)
    elif cfg.baseline == "leave_one_out":
        others = groups.sum(1, keepdims=True) - groups
        values = (others / (cfg.group_size - 1)).reshape(-1)
    else:
        raise ValueError(f"unknown baseline {cfg.baseline!r}")
    advantages = rewards - values
    if cfg.normalize == "group":
        std = jnp.broadcast_to(groups.std(1, keepdims=True), groups.shape).reshape(-1)
        advantages = advantages / (std + _STD_EPS)
    elif cfg.normalize == "batch":
        advantages = advantages / (rewards.std() + _STD_EPS)

    decay = cfg.moving_average_decay
    previous = jnp.where(baseline.count > 0, baseline.value, batch_mean)
    next_baseline = BaselineState(value=decay * previous + (1 - decay) * batch_mean,
                                  count=baseline.count + 1)
    return advantages, values, next_baseline


def policy_gradient_loss(logprobs: jax.Array, response_mask: jax.Array, advantages: jax.Array) -> jax.Array:
    """REINFORCE: -mean_b A_b * log pi(completion_b), the log-prob summed over response tokens."""
    sequence_logprob = jnp.sum(logprobs * response_mask, axis=-1)
    return -jnp.mean(jax.lax.stop_gradient(advantages) * sequence_logprob)


def update(state: TrainState, rollout: Rollout, key: jax.Array, *, cfg: ReinforceConfig,
           ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One REINFORCE step on a scored rollout (pure; jit it, donating `state`)."""
    del key  # no dropout in RL fine-tuning; kept for the loop's step signature
    response = rollout.response_mask.astype(jnp.float32)
    lengths = response.sum(-1)

    def loss_fn(params):
        logprobs = token_logprobs(state.graphdef, params, rollout.tokens, rollout.mask)
        # k1 estimate of KL(pi || pi_ref) per completion, from the sampled tokens.
        kl = jnp.sum((jax.lax.stop_gradient(logprobs) - rollout.ref_logprobs) * response, -1)
        kl_penalty = -cfg.kl_coef * kl
        total = rollout.rewards["reward"] + kl_penalty
        advantages, values, next_baseline = compute_advantages(total, state.extra["baseline"], cfg)
        loss = policy_gradient_loss(logprobs, response, advantages)
        aux = dict(logprobs=logprobs, kl=kl, kl_penalty=kl_penalty, total=total,
                   advantages=advantages, values=values, next_baseline=next_baseline)
        return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads, extra={**state.extra, "baseline": aux["next_baseline"]})

    # -log pi of the sampled tokens: an unbiased per-token entropy estimate when sampling
    # at temperature 1 without top-k/top-p (the default).
    entropy = -jnp.sum(aux["logprobs"] * response) / jnp.maximum(response.sum(), 1.0)
    metrics = {f"reward/{name}": value.mean() for name, value in rollout.rewards.items()
               if name != "reward"}
    metrics |= {
        "reward": aux["total"].mean(),  # host reward + KL penalty: what the policy maximises
        "reward/host": rollout.rewards["reward"].mean(),
        "reward/kl_penalty": aux["kl_penalty"].mean(),
        "kl": aux["kl"].mean(),
        "entropy": entropy,
        "response_length": lengths.mean(),
        "baseline": aux["values"].mean(),
        "advantage_std": aux["advantages"].std(),
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
    }
    return new_state, metrics


# --------------------------------------------------------------------------------------------
# Host side: sampling, scoring, the composed train step


@dataclasses.dataclass
class Samples:
    """A few decoded completions, for logs and README tables."""

    prompts: list[str]
    completions: list[str]
    rewards: dict[str, np.ndarray]

    def rows(self, limit: int | None = None) -> list[dict]:
        out = []
        for i, (p, c) in enumerate(zip(self.prompts[:limit], self.completions[:limit])):
            out.append({"prompt": p, "completion": c,
                        **{k: round(float(v[i]), 4) for k, v in self.rewards.items()}})
        return out


class RolloutCollector:
    """Samples and scores completions of the env's prompts with given params (host-driven)."""

    def __init__(self, env: TextEnv, graphdef: nnx.GraphDef, cfg: ReinforceConfig, *,
                 ref_params: nnx.State | None, batch_sharding=None):
        self.env = env
        self.graphdef = graphdef
        self.cfg = cfg
        self.ref_params = ref_params
        self.batch_sharding = batch_sharding
        self._ref_logprobs = jax.jit(token_logprobs, static_argnums=0)
        self.last_samples: Samples | None = None

    def sample(self, params: nnx.State, prompt_tokens: np.ndarray, prompt_mask: np.ndarray,
               key: jax.Array):
        cfg = self.cfg
        return generate(
            self.graphdef, params, self._place(prompt_tokens), self._place(prompt_mask), key,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
            eos_id=self.env.tokenizer.eot_id, pad_id=self.env.tokenizer.pad_id)

    def score(self, prompts: list[str], generation) -> tuple[dict[str, np.ndarray], Samples]:
        tokens, response_mask = jax.device_get((generation.tokens, generation.response_mask))
        width = tokens.shape[1] - self.cfg.max_new_tokens  # the prompt columns
        completions = self.env.completions(prompts, tokens[:, width:], response_mask[:, width:])
        rewards = self.env.score(completions)
        return rewards, Samples(list(prompts), list(completions.texts), rewards)

    def collect(self, params: nnx.State, index: int, key: jax.Array) -> Rollout:
        """Rollout number `index`: its prompts, each sampled `group_size` times."""
        cfg = self.cfg
        prompts = self.env.prompt_batch(index, cfg.prompts_per_step)
        tokens = np.repeat(prompts.tokens, cfg.group_size, axis=0)
        mask = np.repeat(prompts.mask, cfg.group_size, axis=0)
        texts = [t for t in prompts.texts for _ in range(cfg.group_size)]
        generation = self.sample(params, tokens, mask, key)
        rewards, self.last_samples = self.score(texts, generation)
        if self.ref_params is None:  # no reference model: KL is measured to the sampling policy
            ref = generation.logprobs
        else:
            ref = self._ref_logprobs(self.graphdef, self.ref_params, generation.tokens, generation.mask)
        return Rollout(tokens=generation.tokens, mask=generation.mask,
                       response_mask=generation.response_mask, ref_logprobs=ref,
                       rewards={k: self._place(v) for k, v in rewards.items()})

    def _place(self, x: np.ndarray) -> jax.Array:
        if self.batch_sharding is None:
            return jnp.asarray(x)
        return jax.make_array_from_process_local_data(self.batch_sharding(np.ndim(x)), x)


class CollapseGuard:
    """Warns when entropy drops below the floor or KL exceeds the ceiling: the usual signs that
    the policy is collapsing onto a few reward-hacking strings. One warning per excursion: a
    tripped guard re-arms only once the metric is back inside its bound by a 10% margin, so
    a value hovering at the bound does not warn every step."""

    REARM_MARGIN = 0.1

    def __init__(self, cfg: ReinforceConfig, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.log = log
        self.tripped: set[str] = set()

    def check(self, step: int, entropy: float, kl: float) -> list[str]:
        floor, ceiling, margin = self.cfg.entropy_floor, self.cfg.kl_ceiling, self.REARM_MARGIN
        messages = []
        if floor and entropy < floor and "entropy" not in self.tripped:
            self.tripped.add("entropy")
            messages.append(f"entropy {entropy:.3f} < floor {floor} (the policy is collapsing; "
                            "raise kl_coef or lower the lr)")
        elif entropy > floor * (1 + margin):
            self.tripped.discard("entropy")
        if ceiling and kl > ceiling and "kl" not in self.tripped:
            self.tripped.add("kl")
            messages.append(f"KL to reference {kl:.3f} > ceiling {ceiling} (the policy drifts "
                            "far from the reference; raise kl_coef)")
        elif kl < ceiling * (1 - margin):
            self.tripped.discard("kl")
        messages = [f"[jaxrl] warning: step {step}: {m}" for m in messages]
        for message in messages:
            self.log(message)
        return messages


def make_train_step(env: TextEnv, graphdef: nnx.GraphDef, cfg: ReinforceConfig, *,
                    ref_params: nnx.State | None, update_fn: Callable,
                    batch_sharding=None,
                    guard: CollapseGuard | None = None) -> tuple[Callable, RolloutCollector]:
    """`step(state, None, key) -> (state, metrics)` for the core loop, and its collector.

    The step samples with `state.params` on the prompts of batch number `state.step`, scores on
    the host, then runs `update_fn`: `update` compiled by `jaxrl.core.step.compile_step`
    (state-donating, sharded). `batch_sharding(ndim)` places rollout arrays on the mesh
    (None: one device).
    """
    collector = RolloutCollector(env, graphdef, cfg, ref_params=ref_params,
                                 batch_sharding=batch_sharding)
    guard = guard or CollapseGuard(cfg)

    def step(state: TrainState, batch, key: jax.Array):
        if batch is not None:
            raise ValueError("the REINFORCE step makes its own rollouts; call train() without batches.")
        index = int(state.step)
        sample_key, update_key = jax.random.split(key)
        rollout = collector.collect(state.params, index, sample_key)
        state, metrics = update_fn(state, rollout, update_key)
        entropy, kl = jax.device_get((metrics["entropy"], metrics["kl"]))
        guard.check(index + 1, float(entropy), float(kl))
        return state, metrics

    return step, collector
