"""Continuum Memory System: a chain of residual MLP levels, level l updated every C_l tokens.

Level l is `x + clip(MLP_l(LN_l(x)))` (the delta's per-token norm is at most `residual_clip`).
Its MLP weights are fast state: constant inside a chunk of C_l tokens, then
`theta <- theta - lr_l * sum_chunk grad loss(theta; x_t)` with every gradient taken at the
chunk-start weights (spec §4.1). Because the weights are constant inside a chunk, the token
buffer of a level is kept as the running sum of its pending tokens' gradients plus a token
count (`CMSState.count`): equivalent to buffering the tokens, and counted in tokens across
calls, not in calls. `flush_partial` applies a partial chunk at the end of each call; a
decode (`prefill`, then `decode` one token at a time) never flushes, so each token sees the
weights the whole sequence in one call gives it.

The local objective (`objective: local`) is an associative reconstruction loss,
`||MLP(LN(x_t)) - sg(LN(x_t))||^2`: each level stores what passes through it, at the scale of
its normalised input (the residual stream's own scale grows; a raw target made writes blow up).
Each write's summed gradient is soft-clamped to `max_grad_norm`.

The teach objective (`objective: teach`, KM's, spec §4.2): delta = d(LM loss)/d(level output),
level loss `sum_chunk ||pred - sg(pred - delta)||^2`, whose weight gradient is
`2 J^T delta = 2 d(LM loss)/d(level weights)`: a write along 2 delta. The LM loss needs the
whole model, so HOPE drives it (`HopeConfig` docstring's online pass): per online chunk the
levels `read` at fixed weights, HOPE takes the chunk loss's gradient with respect to them, and
`teach` adds it to the pending sums and applies the levels whose period boundary the chunk
crossed. Delta is a constant to the outer loss (mode S of spec §6.1); with
`writes: differentiable` the initial weights still get the outer gradient through the
written weights' identity path, not through delta. Every period must be a multiple of the
online chunk (`teach_chunk`, default the fastest period), so no level writes inside one.

`state: persistent` (spec §4.3) keeps one `CMSMemory` across sequences: `remember` takes the
batch mean of the examples' final states as a constant offset on the initial weights, `recall`
starts every example of the next sequence from initial weights + that offset (the recipe that
carries it says why one memory, not one per row: `recipes/sft_hope.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl.core.config import ConfigError
from jaxrl.models.titans import Writes, _param, _write, per_example, soft_clamp


@dataclasses.dataclass(frozen=True)
class CMSConfig:
    """Levels and their update periods (spec §4); periods are listed fastest first."""

    periods: tuple[int, ...] = (16, 64)
    expansion: int = 4  # MLP hidden width = expansion * n_embd
    lr: float = 1e-2  # inner learning rate of every level
    residual_clip: float = 1.0  # per-token norm bound of each level's residual delta
    max_grad_norm: float = 1.0  # soft clamp of each write's summed gradient
    flush_partial: bool = True  # apply a partial chunk at the end of each call
    order: Literal["fast_first", "slow_first"] = "fast_first"
    objective: Literal["local", "teach"] = "local"
    teach_chunk: int = 0  # objective=teach: tokens per online chunk (0: the fastest period)
    state: Literal["per_sequence", "persistent"] = "per_sequence"

    def validate(self):
        if not self.periods or min(self.periods) < 1:
            raise ConfigError(f"cms.periods must be positive, got {self.periods}.")
        if self.teach_chunk < 0 or (self.objective == "teach"
                                    and any(p % self.online_chunk for p in self.periods)):
            raise ConfigError(f"cms.teach_chunk={self.teach_chunk} must divide every period "
                              f"{self.periods} (a level writes only between online chunks); "
                              "0 takes the fastest period.")
        if self.lr < 0 or self.residual_clip <= 0 or self.max_grad_norm <= 0:
            raise ConfigError("cms.lr must be >= 0, cms.residual_clip and max_grad_norm > 0.")

    @property
    def online_chunk(self) -> int:
        return self.teach_chunk or min(self.periods)


@flax.struct.dataclass
class CMSState:
    """Per-example: every level's weights (w_in [B, d, 4d], w_out [B, 4d, d]) and pending grads."""

    weights: tuple  # per level (w_in, w_out) float32
    pending: tuple  # same shapes: summed gradients of the current, unfinished chunk
    count: jax.Array  # [B] int32 tokens seen (all levels count the same tokens)


@flax.struct.dataclass
class CMSMemory:
    """`state: persistent`'s carried CMS state, one for the whole batch (see the docstring)."""

    offset: tuple  # per level (w_in, w_out) float32: the weights minus the initial weights
    pending: tuple  # per level: pending gradients of the unfinished chunk (batch mean)
    count: jax.Array  # [] int32 tokens seen


def clip_norm(x, max_norm: float):
    """Rescale each row so its norm is at most max_norm."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)
    return x * jnp.minimum(1.0, max_norm / norm)


def level_delta(weights, h):
    w_in, w_out = weights
    return jax.nn.gelu(h @ w_in) @ w_out


def local_loss(w, x, mask, norm):
    """Associative reconstruction loss of tokens x [n, d] (mask [n]) at one level's weights."""
    h = norm(x)
    return jnp.sum(mask[:, None] * (level_delta(w, h) - jax.lax.stop_gradient(h)) ** 2)


def run_level(weights, pending, count, x, real, *, norm, period: int, cfg: CMSConfig,
              writes: Writes, flush: bool):
    """One level over one example's call. x: [T, d]; real: [T] bool. -> (y, weights', pending').

    The call is placed at offset `count % period` in a buffer of whole chunks, so chunk j of
    the buffer is chunk j of the global token grid; its first `offset` slots belong to the
    previous call, whose gradients are already in `pending`.
    """
    T, d = x.shape
    offset = count % period
    n_chunks = -(-(T + period - 1) // period)
    buf = jax.lax.dynamic_update_slice(jnp.zeros((n_chunks * period, d), x.dtype), x, (offset, 0))
    mask = jax.lax.dynamic_update_slice(jnp.zeros((n_chunks * period,), bool), real, (offset,))
    ends = (jnp.arange(n_chunks) + 1) * period  # [n_chunks]
    complete = ends <= offset + T
    last = jnp.arange(n_chunks) == (offset + T - 1) // period  # the chunk holding the last token

    @jax.checkpoint
    def chunk_step(carry, inputs):
        w, acc = carry
        xc, mc, done, is_last = inputs
        y = xc + clip_norm(level_delta(w, norm(xc)), cfg.residual_clip)  # [period, d]
        acc = jax.tree.map(jnp.add, acc, jax.grad(local_loss)(w, xc, mc, norm))
        w, acc = apply_pending(w, acc, done | (is_last & flush), cfg=cfg, writes=writes)
        return (w, acc), y

    (weights, pending), ys = jax.lax.scan(
        chunk_step, (weights, pending),
        (buf.reshape(n_chunks, period, d), mask.reshape(n_chunks, period), complete, last))
    y = jax.lax.dynamic_slice(ys.reshape(n_chunks * period, d), (offset, 0), (T, d))  # [T, d]
    return y, weights, pending


def apply_pending(weights, pending, apply, *, cfg: CMSConfig, writes: Writes):
    """One example's level: where `apply`, step by the soft-clamped pending gradient and clear
    it. -> (weights', pending')."""
    update = soft_clamp(pending, cfg.max_grad_norm)
    stepped = _write(weights, jax.tree.map(lambda p, g: p - cfg.lr * g, weights, update), writes)
    weights = jax.tree.map(lambda a, b: jnp.where(apply, a, b), stepped, weights)
    return weights, jax.tree.map(lambda g: jnp.where(apply, 0.0, g), pending)


def level_token(weights, pending, count, x, real, *, norm, period: int, cfg: CMSConfig):
    """`run_level` on one token x [d] of one example, never flushing. -> (y, weights', pending')."""
    y = x + clip_norm(level_delta(weights, norm(x)), cfg.residual_clip)
    grad = jax.grad(local_loss)(weights, x[None], real[None], norm)
    pending = jax.tree.map(jnp.add, pending, grad)
    done = count % period == period - 1  # this token completes its chunk
    return y, *apply_pending(weights, pending, done, cfg=cfg, writes="differentiable")


class CMS(nnx.Module):
    """The chain of levels; `__call__(x, real, fast) -> (y, fast')`, pure in `fast`."""

    def __init__(self, cfg: CMSConfig, d_model: int, *, writes: Writes, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.cfg, self.writes, self.dtype = cfg, writes, dtype
        periods = cfg.periods if cfg.order == "fast_first" else tuple(reversed(cfg.periods))
        self.periods = tuple(periods)
        hidden = cfg.expansion * d_model
        normal = nnx.initializers.normal
        self.norms = nnx.List([nnx.LayerNorm(d_model, dtype=jnp.float32, param_dtype=param_dtype,
                                             rngs=rngs) for _ in periods])
        self.init_weights = nnx.List([nnx.List([
            _param(normal(0.02), (d_model, hidden), ("embed", "mlp"), rngs),
            _param(normal(0.02 / len(periods)), (hidden, d_model), ("mlp", "embed"), rngs)])
            for _ in periods])

    def init_fast(self, batch_size: int) -> CMSState:
        weights = tuple((per_example(w_in, batch_size), per_example(w_out, batch_size))
                        for w_in, w_out in self.init_weights)
        return CMSState(weights=weights, pending=jax.tree.map(jnp.zeros_like, weights),
                        count=jnp.zeros((batch_size,), jnp.int32))

    def __call__(self, x, real, fast: CMSState, *, flush: bool | None = None):
        """x: [B, T, d]; real: [B, T] bool. Each level sees the previous level's output.

        `flush` overrides `cfg.flush_partial` (`prefill` passes False).
        """
        flush = self.cfg.flush_partial if flush is None else flush
        h = x.astype(jnp.float32)
        weights, pending = [], []
        for norm, period, w, p in zip(self.norms, self.periods, fast.weights, fast.pending):
            level = lambda w, p, c, xb, rb, norm=norm, period=period: run_level(  # noqa: E731
                w, p, c, xb, rb, norm=norm, period=period, cfg=self.cfg, writes=self.writes,
                flush=flush)
            h, w, p = jax.vmap(level)(w, p, fast.count, h, real)  # per example
            weights.append(w)
            pending.append(p)
        count = fast.count + x.shape[1]
        return h.astype(self.dtype), CMSState(tuple(weights), tuple(pending), count)

    def read(self, x, weights):
        """x [B, T, d] through the levels at fixed weights (per level (w_in, w_out) [B, ...])."""
        h = x.astype(jnp.float32)
        for norm, w in zip(self.norms, weights):
            h = h + clip_norm(jax.vmap(level_delta)(w, norm(h)), self.cfg.residual_clip)
        return h.astype(self.dtype)

    def teach(self, fast: CMSState, lm_grads, tokens, *, last):
        """Take one online chunk of `tokens` into `fast` (objective: teach). -> fast'.

        `lm_grads`: per level, d(chunk LM loss)/d(weights) [B, ...] at the weights the chunk
        read; the level loss sum ||pred - sg(pred - delta)||^2 has twice that gradient. A level
        applies its pending sum when the chunk crosses its period boundary, or (flush_partial)
        when `last`.
        """
        count = fast.count + tokens
        weights, pending = [], []
        for period, w, p, g in zip(self.periods, fast.weights, fast.pending, lm_grads):
            p = jax.tree.map(lambda a, b: a + 2.0 * b, p, g)
            apply = (count // period > fast.count // period) | (last & self.cfg.flush_partial)
            w, p = jax.vmap(lambda w, p, a: apply_pending(w, p, a, cfg=self.cfg,
                                                          writes=self.writes))(w, p, apply)
            weights.append(w)
            pending.append(p)
        return CMSState(tuple(weights), tuple(pending), count)

    def empty_memory(self) -> CMSMemory:
        zeros = tuple((jnp.zeros(w_in.shape), jnp.zeros(w_out.shape))
                      for w_in, w_out in self.init_weights)
        return CMSMemory(offset=zeros, pending=zeros, count=jnp.zeros((), jnp.int32))

    def recall(self, memory: CMSMemory, batch_size: int) -> CMSState:
        """Every example's state from `memory`: initial weights + sg(offset), so the initial
        weights keep their outer gradient through the reads (spec §6.1's meta + sg(delta))."""
        sg, rows = jax.lax.stop_gradient, lambda a: jnp.broadcast_to(a, (batch_size, *a.shape))
        weights = tuple((per_example(w_in, batch_size) + sg(d_in), per_example(w_out, batch_size)
                         + sg(d_out)) for (w_in, w_out), (d_in, d_out)
                        in zip(self.init_weights, memory.offset))
        pending = jax.tree.map(lambda p: rows(sg(p)), memory.pending)
        return CMSState(weights=weights, pending=pending, count=rows(memory.count))

    def remember(self, fast: CMSState) -> CMSMemory:
        """The batch mean of the examples' states, as a constant offset on the initial weights."""
        sg = jax.lax.stop_gradient
        f32 = lambda w: w[...].astype(jnp.float32)  # noqa: E731
        offset = tuple((sg(w_in.mean(0) - f32(i_in)), sg(w_out.mean(0) - f32(i_out)))
                      for (w_in, w_out), (i_in, i_out) in zip(fast.weights, self.init_weights))
        return CMSMemory(offset=offset, pending=jax.tree.map(lambda p: sg(p.mean(0)), fast.pending),
                         count=fast.count.max())

    def prefill(self, x, real, fast: CMSState):
        """`__call__` on a prompt without the flush: the state a `decode` continues from."""
        return self(x, real, fast, flush=False)

    def decode(self, x, real, fast: CMSState):
        """One token x [B, d] (real [B] bool): `__call__` on it, never flushing. -> (y, fast')."""
        h = x.astype(jnp.float32)
        weights, pending = [], []
        for norm, period, w, p in zip(self.norms, self.periods, fast.weights, fast.pending):
            level = lambda w, p, c, xb, rb, norm=norm, period=period: level_token(  # noqa: E731
                w, p, c, xb, rb, norm=norm, period=period, cfg=self.cfg)
            h, w, p = jax.vmap(level)(w, p, fast.count, h, real)  # per example
            weights.append(w)
            pending.append(p)
        return h.astype(self.dtype), CMSState(tuple(weights), tuple(pending), fast.count + 1)
