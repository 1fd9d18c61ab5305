"""Sampling from GPT-2 with a KV cache, the whole decode loop one compiled `lax.while_loop`.

Functions take the model as `(graphdef, params)` from `nnx.split(model)`, so they are pure and
can run inside a jitted RL step. `token_logprobs` is the one place sequence log-probabilities
are computed: losses and rollouts both use it, so their numerics agree.
"""

from __future__ import annotations

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
    logprobs: jax.Array  # f32 log p(token | prefix) at temperature 1, 0 where response_mask = 0


def token_logprobs(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """log p(tokens[:, t] | tokens[:, :t]) as [B, T] float32; 0 at t = 0 and where mask = 0.

    Differentiable; uses the model's full forward pass (no cache), as training losses do.
    """
    model = nnx.merge(graphdef, params)
    logits = model(tokens, mask)
    logprobs = _gather_logprobs(logits[:, :-1], tokens[:, 1:])
    logprobs = jnp.where(mask[:, 1:].astype(bool), logprobs, 0.0)
    return jnp.pad(logprobs, ((0, 0), (1, 0)))


def _gather_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


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
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = _filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


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
      `Generation`. `logprobs` come from the untempered, unfiltered model distribution (the
      distribution `token_logprobs` scores), which is what policy-gradient ratios need.
      The loop exits early once every row has emitted EOS.
    """
    model = nnx.merge(graphdef, params)
    batch, prompt_len = prompt_tokens.shape
    total_len = prompt_len + max_new_tokens
    prompt_mask = prompt_mask.astype(bool) & (prompt_tokens != pad_id)

    cache = KVCache.empty(model.cfg, batch, total_len)
    logits, cache = model(prompt_tokens, prompt_mask, cache=cache)
    tokens = jnp.full((batch, total_len), pad_id, jnp.int32).at[:, :prompt_len].set(prompt_tokens)
    response_mask = jnp.zeros((batch, total_len), bool)
    logprobs = jnp.zeros((batch, total_len), jnp.float32)

    def still_going(carry):
        step, _, _, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_step(carry):
        step, tokens, response_mask, logprobs, last_logits, done, cache, key = carry
        key, sample_key = jax.random.split(key)
        token = sample_token(last_logits, sample_key, temperature=temperature, top_k=top_k, top_p=top_p)
        real = ~done  # rows that already emitted EOS write padding from now on
        token = jnp.where(real, token, pad_id)
        logprob = jnp.where(real, _gather_logprobs(last_logits, token), 0.0)
        column = prompt_len + step
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, column))
        response_mask = jax.lax.dynamic_update_slice(response_mask, real[:, None], (0, column))
        logprobs = jax.lax.dynamic_update_slice(logprobs, logprob[:, None], (0, column))
        logits, cache = model(token[:, None], real[:, None], cache=cache)
        done = done | (token == eos_id)
        return step + 1, tokens, response_mask, logprobs, logits[:, -1], done, cache, key

    carry = (jnp.int32(0), tokens, response_mask, logprobs, logits[:, -1], jnp.zeros(batch, bool), cache, key)
    _, tokens, response_mask, logprobs, _, _, _, _ = jax.lax.while_loop(still_going, decode_step, carry)

    mask = jnp.concatenate([prompt_mask, response_mask[:, prompt_len:]], axis=1)
    return Generation(
        tokens=tokens,
        mask=mask.astype(jnp.int32),
        response_mask=response_mask.astype(jnp.int32),
        logprobs=logprobs,
    )
