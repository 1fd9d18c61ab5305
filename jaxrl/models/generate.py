"""Sampling from GPT-2 with a KV cache, the whole decode loop one compiled `lax.while_loop`.

Functions take the model as `(graphdef, params)` from `nnx.split(model)`, so they are pure and
can run inside a jitted RL step. `token_logprobs` is the one place sequence log-probabilities
are computed: losses and rollouts both use it, so their numerics agree. Both apply the
sampling transform (`temperature`, then `top_k` / `top_p`) with one function,
`sampling_logits`, so a loss scores tokens under the distribution that sampled them, and both
take the log-softmax in float32 (the model's head already returns f32 logits).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl.models.gpt2 import PAD_ID, KVCache

EOT_ID = 50256


@flax.struct.dataclass
class Generation:
    """A batch of sampled sequences, prompt included; all arrays are [B, P + max_new_tokens]."""

    tokens: jax.Array  # int32; pad_id after EOS and on left padding
    mask: jax.Array  # 1 on real tokens (prompt and generated)
    response_mask: jax.Array  # 1 on generated tokens up to and including EOS
    logprobs: jax.Array  # f32 log p(token | prefix) under the sampling transform, 0 off the response


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How tokens are drawn: `temperature` (0 = greedy), then `top_k` (0 = off) and `top_p`
    (1 = off). Frozen, so a rollout can carry it as a static (compile-time) setting."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self):
        if self.temperature < 0 or self.top_k < 0:
            raise ValueError(f"sampling: temperature and top_k must be >= 0, got "
                             f"{self.temperature} and {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling: top_p must be in (0, 1], got {self.top_p}.")

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


def check_positions(n_positions: int, width: int, what: str = "the sequence"):
    """GPT-2 has `n_positions` learned positions; past them the embedding lookup would clamp
    silently and every later token would share the last position."""
    if width > n_positions:
        raise ValueError(f"{what} is {width} tokens wide, past the model's n_positions="
                         f"{n_positions}; shorten the prompt (max_prompt_tokens / prefix_tokens) "
                         "or max_new_tokens.")


def token_logprobs(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, mask: jax.Array,
                   *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """log p(tokens[:, t] | tokens[:, :t]) as [B, T] float32; 0 at t = 0 and where mask = 0.

    p is the model's distribution after the sampling transform (see `sampling_logits`), so
    with the settings `generate` sampled with this equals its `Generation.logprobs`.
    Differentiable; uses the model's full forward pass (no cache), as training losses do.
    """
    model = nnx.merge(graphdef, params)
    check_positions(model.cfg.n_positions, tokens.shape[1])
    logits = sampling_logits(model(tokens, mask)[:, :-1], temperature, top_k, top_p)
    logprobs = _gather_logprobs(logits, tokens[:, 1:])
    logprobs = jnp.where(mask[:, 1:].astype(bool), logprobs, 0.0)
    return jnp.pad(logprobs, ((0, 0), (1, 0)))


def _gather_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Log-softmax at `tokens`, in float32."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def sampling_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """The logits of the distribution tokens are drawn from: f32, divided by the temperature
    (0, greedy, scores with the untempered model), then top-k / top-p filtered."""
    logits = logits.astype(jnp.float32)
    if temperature > 0.0:
        logits = logits / temperature
    return _filter_logits(logits, top_k, top_p)


def _filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Keep the top-k logits, then the smallest set whose probability reaches top_p."""
    very_negative = jnp.finfo(jnp.float32).min
    if top_k > 0:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, very_negative, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        # A token stays if the mass strictly before it is < top_p (so the top token always stays).
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(sorted_logits, kept - 1, axis=-1)
        logits = jnp.where(logits < threshold, very_negative, logits)
    return logits


def sample_token(logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """One token per row from [B, V] logits; temperature 0 is greedy (argmax)."""
    return _draw(sampling_logits(logits, temperature, top_k, top_p), key, greedy=temperature == 0.0)


def _draw(scored: jax.Array, key: jax.Array, *, greedy: bool) -> jax.Array:
    """A token per row from `sampling_logits` output."""
    if greedy:
        return jnp.argmax(scored, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, scored, axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class _Decode:
    """The decode loop's carry."""

    step: jax.Array  # [] int32, tokens generated so far
    tokens: jax.Array
    response_mask: jax.Array
    logprobs: jax.Array
    last_logits: jax.Array  # [B, V] logits for the next token
    done: jax.Array  # [B] bool, the row has emitted EOS
    cache: KVCache
    key: jax.Array


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "pad_id"),
)
def generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int = EOT_ID,
    pad_id: int = PAD_ID,
) -> Generation:
    """Sample up to `max_new_tokens` per row after left-padded prompts.

    Args:
      graphdef, params: `nnx.split(model)` of a `GPT2`.
      prompt_tokens: [B, P] int32, left-padded with `pad_id` (every row needs >= 1 real token).
      prompt_mask: [B, P], 1 on real prompt tokens.
      key: PRNG key for sampling (unused when temperature = 0).
      temperature: 0 = greedy; top_k = 0 and top_p = 1 disable those filters.
      eos_id: a row stops after sampling it; later slots hold `pad_id` with masks 0.

    Returns:
      `Generation`. `logprobs` score each token under the distribution it was drawn from
      (tempered and filtered; untempered when greedy), as `token_logprobs` with the same
      settings does. The loop exits early once every row has emitted EOS.

    Raises:
      ValueError: `P + max_new_tokens` exceeds the model's `n_positions`.
    """
    model = nnx.merge(graphdef, params)
    batch, prompt_len = prompt_tokens.shape
    total_len = prompt_len + max_new_tokens
    check_positions(model.cfg.n_positions, total_len,
                    f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens})")
    prompt_mask = prompt_mask.astype(bool) & (prompt_tokens != pad_id)

    cache = KVCache.empty(model.cfg, batch, total_len)
    logits, cache = model(prompt_tokens, prompt_mask, cache=cache)
    tokens = jnp.full((batch, total_len), pad_id, jnp.int32).at[:, :prompt_len].set(prompt_tokens)
    response_mask = jnp.zeros((batch, total_len), bool)
    logprobs = jnp.zeros((batch, total_len), jnp.float32)

    def still_going(carry: _Decode):
        return (carry.step < max_new_tokens) & ~jnp.all(carry.done)

    def decode_step(c: _Decode) -> _Decode:
        key, sample_key = jax.random.split(c.key)
        scored = sampling_logits(c.last_logits, temperature, top_k, top_p)
        real = ~c.done  # rows that already emitted EOS write padding from now on
        token = jnp.where(real, _draw(scored, sample_key, greedy=temperature == 0.0), pad_id)
        logprob = jnp.where(real, _gather_logprobs(scored, token), 0.0)
        column = prompt_len + c.step
        logits, cache = model(token[:, None], real[:, None], cache=c.cache)
        return _Decode(
            step=c.step + 1,
            tokens=jax.lax.dynamic_update_slice(c.tokens, token[:, None], (0, column)),
            response_mask=jax.lax.dynamic_update_slice(c.response_mask, real[:, None], (0, column)),
            logprobs=jax.lax.dynamic_update_slice(c.logprobs, logprob[:, None], (0, column)),
            last_logits=logits[:, -1], done=c.done | (token == eos_id), cache=cache, key=key)

    start = _Decode(step=jnp.int32(0), tokens=tokens, response_mask=response_mask,
                    logprobs=logprobs, last_logits=logits[:, -1], done=jnp.zeros(batch, bool),
                    cache=cache, key=key)
    end = jax.lax.while_loop(still_going, decode_step, start)
    tokens, response_mask, logprobs = end.tokens, end.response_mask, end.logprobs

    mask = jnp.concatenate([prompt_mask, response_mask[:, prompt_len:]], axis=1)
    return Generation(
        tokens=tokens,
        mask=mask.astype(jnp.int32),
        response_mask=response_mask.astype(jnp.int32),
        logprobs=logprobs,
    )
