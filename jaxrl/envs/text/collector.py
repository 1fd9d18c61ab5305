"""The host half of LM reinforcement learning: sample, score, hand a `Rollout` to the update.

`RolloutCollector.start` takes the env's prompts for a step, dispatches `group_size`
completions of each with the jitted `generate` and the reference model's log-prob pass;
`finish` then blocks on the host to decode and reward the completions, so the device scores
the reference while the host scores the text. `make_train_step` wraps it and a compiled pure
update (`jaxrl.algorithms.policy_gradient.update`) into the core loop's `step(state, None,
key)`; beyond the completions it scores, the step reads nothing back from the device that it
would have to wait for. With `rollout.prefetch` the step also dispatches the *next* batch's
sampling before it grades this one, so the device samples while the host runs rewards (a
simulator, a sandbox): each batch is then sampled one update stale, which the update's
importance ratio against the stored sampler log-probs accounts for (PipelineRL / async GRPO).

Known limit: one process. `score` reads the whole batch on this host (the recipe's
`SINGLE_PROCESS` says so to `jaxrl.launch`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.struct
import jax
import numpy as np
from flax import nnx

from jaxrl.core.config import ConfigError
from jaxrl.envs.text.env import TextEnv
from jaxrl.models.generate import Generation, Sampling, check_positions, generate, token_logprobs


@dataclasses.dataclass
class RolloutConfig:
    """What one step samples: `prompts_per_step` prompts x `group_size` completions each."""

    prompts_per_step: int = 8
    group_size: int = 4  # completions per prompt; rows [i*G, (i+1)*G) share prompt i
    max_new_tokens: int = 48
    sampling: Sampling = dataclasses.field(default_factory=Sampling)
    # Sample batch i+1 while the host scores batch i (one update stale; see the module doc).
    prefetch: bool = False
    # Evaluations sample at this temperature (None: sampling.temperature; 0: greedy). A small
    # policy's pass@1 at a low temperature says more than at the exploring one RL trains at.
    eval_temperature: float | None = None

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.group_size

    def validate(self):
        for name in ("prompts_per_step", "group_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rollout.{name} must be >= 1, got {getattr(self, name)}.")
        if self.eval_temperature is not None and self.eval_temperature < 0:
            raise ConfigError(f"rollout.eval_temperature must be >= 0 (0: greedy) or null, got "
                              f"{self.eval_temperature}.")

    def for_eval(self, prompts: int) -> RolloutConfig:
        """One completion of each of `prompts` prompts, at the evaluation temperature."""
        sampling = self.sampling
        if self.eval_temperature is not None:
            sampling = dataclasses.replace(sampling, temperature=self.eval_temperature)
        return dataclasses.replace(self, prompts_per_step=prompts, group_size=1, sampling=sampling,
                                   prefetch=False)


@flax.struct.dataclass
class Rollout:
    """Scored completions, prompt included; token arrays are [B, P + max_new_tokens].

    `group_size` and `sampling` are static: the update compiles for them.
    """

    tokens: jax.Array
    mask: jax.Array  # 1 on real tokens (prompt and completion)
    response_mask: jax.Array  # 1 on generated tokens, up to and including end-of-text
    logprobs: jax.Array  # the sampler's log p(token) under `sampling`, 0 off the response
    ref_logprobs: jax.Array  # the reference model's at the sampling temperature, unfiltered
    rewards: dict[str, jax.Array]  # [B] each: host reward components and their total "reward"
    group_size: int = flax.struct.field(pytree_node=False, default=1)
    sampling: Sampling = flax.struct.field(pytree_node=False, default=Sampling())


@dataclasses.dataclass
class PendingRollout:
    """A batch whose sampling and reference pass are dispatched but not yet scored."""

    texts: list[str]  # the prompt of each row
    generation: Generation
    ref_logprobs: jax.Array


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

    can_prefetch = True  # False where a batch is graded between samplings (multi-turn)

    def __init__(self, env: TextEnv, graphdef: nnx.GraphDef, cfg: RolloutConfig, *,
                 n_positions: int, ref_params: nnx.State | None, batch_sharding=None,
                 ref_graphdef: nnx.GraphDef | None = None):
        check_positions(n_positions, env.max_prompt_tokens + cfg.max_new_tokens,
                        f"the env's max_prompt_tokens ({env.max_prompt_tokens}) + "
                        f"rollout.max_new_tokens ({cfg.max_new_tokens})")
        self.env = env
        self.graphdef = graphdef
        self.cfg = cfg
        self.ref_params = ref_params
        # Another architecture may score the reference (a distillation teacher); default: ours.
        self.ref_graphdef = ref_graphdef or graphdef
        self.batch_sharding = batch_sharding
        # The reference is tempered like the policy but not top-k / top-p filtered: a token
        # outside its own kept set would make the KL to it infinite.
        score = functools.partial(token_logprobs, temperature=cfg.sampling.temperature)
        self._ref_logprobs = jax.jit(score, static_argnums=0)
        self.last_samples: Samples | None = None

    def sample(self, params: nnx.State, prompt_tokens: np.ndarray, prompt_mask: np.ndarray,
               key: jax.Array) -> Generation:
        """Dispatch generation (returns before the device is done)."""
        return generate(
            self.graphdef, params, self._place(prompt_tokens), self._place(prompt_mask), key,
            max_new_tokens=self.cfg.max_new_tokens, **self.cfg.sampling.kwargs(),
            eos_id=self.env.tokenizer.eot_id, pad_id=self.env.tokenizer.pad_id)

    def score(self, prompts: list[str], generation: Generation,
              ) -> tuple[dict[str, np.ndarray], Samples]:
        """Decode and reward on the host (blocks until the generation is done)."""
        tokens, response_mask = jax.device_get((generation.tokens, generation.response_mask))
        width = tokens.shape[1] - self.cfg.max_new_tokens  # the prompt columns
        completions = self.env.completions(prompts, tokens[:, width:], response_mask[:, width:])
        rewards = self.env.score(completions)
        return rewards, Samples(list(prompts), list(completions.texts), rewards)

    def collect(self, params: nnx.State, index: int, key: jax.Array) -> Rollout:
        """Rollout number `index`: its prompts, each sampled `group_size` times."""
        return self.finish(self.start(params, index, key))

    def start(self, params: nnx.State, index: int, key: jax.Array) -> PendingRollout:
        """Dispatch rollout number `index`'s sampling and reference pass; returns at once."""
        cfg = self.cfg
        prompts = self.env.prompt_batch(index, cfg.prompts_per_step)
        tokens = np.repeat(prompts.tokens, cfg.group_size, axis=0)
        mask = np.repeat(prompts.mask, cfg.group_size, axis=0)
        texts = [t for t in prompts.texts for _ in range(cfg.group_size)]
        generation = self.sample(params, tokens, mask, key)
        # Dispatched before the host blocks on rewards: the device scores the reference while
        # the host decodes and scores text. No reference: KL is measured to the sampler.
        ref = generation.logprobs
        if self.ref_params is not None:
            ref = self._ref_logprobs(self.ref_graphdef, self.ref_params, generation.tokens,
                                     generation.mask)
        return PendingRollout(texts, generation, ref)

    def finish(self, pending: PendingRollout) -> Rollout:
        """Score a started batch on the host (blocks until its generation is done)."""
        generation, cfg = pending.generation, self.cfg
        rewards, self.last_samples = self.score(pending.texts, generation)
        return Rollout(tokens=generation.tokens, mask=generation.mask,
                       response_mask=generation.response_mask, logprobs=generation.logprobs,
                       ref_logprobs=pending.ref_logprobs,
                       rewards={k: self._place(v) for k, v in rewards.items()},
                       group_size=cfg.group_size, sampling=cfg.sampling)

    def _place(self, x: np.ndarray) -> jax.Array:
        """An explicit transfer, so a step passes under `jax.transfer_guard("disallow")`."""
        if self.batch_sharding is None:
            return jax.device_put(x)
        return jax.make_array_from_process_local_data(self.batch_sharding(np.ndim(x)), x)


@dataclasses.dataclass
class GuardConfig:
    """Warning thresholds for a collapsing policy (0 = off)."""

    entropy_floor: float = 0.0  # warn when per-token entropy falls below this
    kl_ceiling: float = 0.0  # warn when KL to the reference rises above this

    def validate(self):
        if self.entropy_floor < 0 or self.kl_ceiling < 0:
            raise ConfigError(f"guard: entropy_floor and kl_ceiling must be >= 0, got "
                              f"{self.entropy_floor} and {self.kl_ceiling}.")


class CollapseGuard:
    """Warns when entropy drops below the floor or KL exceeds the ceiling: the usual signs that
    the policy is collapsing onto a few reward-hacking strings. One warning per excursion: a
    tripped guard re-arms only once the metric is back inside its bound by a 10% margin, so
    a value hovering at the bound does not warn every step."""

    REARM_MARGIN = 0.1

    def __init__(self, cfg: GuardConfig, log: Callable[[str], None] = print):
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


@dataclasses.dataclass
class _StepClock:
    """Host-side step bookkeeping, so no step waits on the device to learn its own number."""

    index: int | None = None  # the next rollout's number; read from the state once (resume)
    previous: dict | None = None  # the last update's metrics, checked one step late
    pending: PendingRollout | None = None  # rollout.prefetch: batch `index`, already sampling


def make_train_step(env: TextEnv, graphdef: nnx.GraphDef, cfg: RolloutConfig, *,
                    n_positions: int, ref_params: nnx.State | None, update_fn: Callable,
                    batch_sharding=None, guard: CollapseGuard | None = None,
                    ref_graphdef: nnx.GraphDef | None = None,
                    collector: RolloutCollector | None = None) -> tuple[Callable, RolloutCollector]:
    """`step(state, None, key) -> (state, metrics)` for the core loop, and its collector.

    The step samples with `state.params` on the prompts of batch number `state.step`, scores on
    the host, then dispatches `update_fn`: a pure update compiled by
    `jaxrl.core.step.compile_step` (state-donating, sharded). `batch_sharding(ndim)` places
    rollout arrays on the mesh (None: one device). The guard reads the previous step's
    metrics once this step's rollout is scored: by then they are computed, so reading them
    costs no wait. `ref_graphdef`: the reference's architecture when it is not the policy's;
    `collector`: a ready one (e.g. the RTL env's multi-turn collector) instead of a new one.

    `cfg.prefetch`: batch i+1 is dispatched with the pre-update params before batch i is
    scored. A resumed run samples its first batch with the restored params (on-policy), so
    with prefetch, resume is exact up to that one batch's sampling staleness.
    """
    collector = collector or RolloutCollector(env, graphdef, cfg, n_positions=n_positions,
                                              ref_params=ref_params, batch_sharding=batch_sharding,
                                              ref_graphdef=ref_graphdef)
    if cfg.prefetch and not collector.can_prefetch:
        raise ConfigError(f"rollout.prefetch=true needs a one-pass collector; "
                          f"{type(collector).__name__} grades between turns before it can sample "
                          "again. Set rollout.prefetch=false (or use one turn).")
    guard = guard or CollapseGuard(GuardConfig())
    clock = _StepClock()

    def step(state, batch, key: jax.Array):
        if batch is not None:
            raise ValueError("the policy-gradient step makes its own rollouts; call train() "
                             "without batches.")
        if clock.index is None:
            clock.index = int(state.step)
        sample_key, update_key = jax.random.split(key)
        if cfg.prefetch:
            pending = clock.pending or collector.start(state.params, clock.index, sample_key)
            # The next batch samples with these params while the host scores this one.
            clock.pending = collector.start(state.params, clock.index + 1,
                                            jax.random.fold_in(sample_key, 1))
            rollout = collector.finish(pending)
        else:
            rollout = collector.collect(state.params, clock.index, sample_key)
        if clock.previous is not None:
            entropy, kl = jax.device_get((clock.previous["entropy"], clock.previous["kl"]))
            guard.check(clock.index, float(entropy), float(kl))
        state, metrics = update_fn(state, rollout, update_key)
        clock.index += 1
        clock.previous = metrics
        return state, metrics

    return step, collector
