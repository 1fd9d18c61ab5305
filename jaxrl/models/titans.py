"""Titans neural memory and the self-modifying Titans mixer (HOPE's token mixer).

Both are fast-weight memories: small MLPs whose weights change inside the forward pass. Their
slow (outer) parameters are projections, gates, convs and the memories' *initial* weights; the
fast state is an explicit pytree (`TitansState`, `SelfModState`) with a leading batch axis,
computed per example under `jax.vmap` (never shared across the batch) and kept in float32
whatever the compute dtype. The per-example functions see one head of one example.

Two write modes: "differentiable" (the recurrence is plain JAX, so the outer gradient reaches
the initial weights and the gates through every write; each chunk is `jax.checkpoint`ed) and
"stop_gradient" (`new = old + sg(new - old)`: the write is a constant to the outer loss, the
initial weights still get first-order gradients through the reads).

Known limits: the chunk grid restarts at every call and the causal conv starts each call with
an empty history, so a sequence fed in several calls is not bit-equal to one call. Decoding
avoids both: `prefill` runs a prompt (as a call, from a chunk-grid origin) and returns a decode
state (`TitansDecode`, `SelfModDecode`) that also holds the current chunk's partial progress
and the conv's last inputs; `decode` advances it one token at a time and gives the outputs the
chunked forward gives on the whole sequence. The decode path is for inference: it applies
writes directly, without a `writes` mode. `start` / `extend` / `finish` continue the chunked
forward piece by piece (whole chunks, conv history carried, `writes` honoured): HOPE's online
teach pass runs its mixers that way, and gets the outputs of one call.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl.core.config import ConfigError

Writes = Literal["differentiable", "stop_gradient"]


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """Fast-weight memory of the Titans LMM and of the self-modifying mixer (spec §2, §3)."""

    heads: int = 4
    depth: int = 2  # Titans memory MLP layers (1: linear matrix memory)
    expansion: int = 2  # hidden width = expansion * head_dim
    chunk_size: int = 16  # gradients inside a chunk are taken at the chunk-start weights
    gate_granularity: Literal["token", "chunk"] = "token"  # Titans theta is per token always
    unit_size: int = 4  # gate_granularity=chunk: tokens per summed gradient and per eta/alpha
    read_after_write: bool = False  # Titans: token t reads weights that include its own write
    max_lr: float = 0.1  # bounded inner lr in (0, max_lr): theta (Titans), eta (self-mod)
    max_surprise_norm: float = 1.0  # soft clamp of each write's gradient norm
    conv_width: int = 4  # short causal depthwise conv on q/k/v
    # self-modifying mixer only
    memory_chunk_size: int = 64  # M_memory's update period (a multiple of chunk_size)
    adaptive_q: bool = False  # q from its own adaptive memory instead of a fixed projection
    dgd_precond_target: Literal["input", "none"] = "input"  # matrix that gets (alpha I - eta k k^T)
    stopgrad_vhat: bool = True  # self-generated targets are constants of the inner loss

    def validate(self):
        if self.heads < 1 or self.depth < 1 or self.expansion < 1 or self.conv_width < 1:
            raise ConfigError("memory: heads, depth, expansion and conv_width must be >= 1.")
        if self.chunk_size < 1 or self.chunk_size % self.unit_size:
            raise ConfigError(f"memory.chunk_size={self.chunk_size} must be a positive multiple of "
                              f"memory.unit_size={self.unit_size}.")
        if self.memory_chunk_size % self.chunk_size:
            raise ConfigError(f"memory.memory_chunk_size={self.memory_chunk_size} must be a "
                              f"multiple of memory.chunk_size={self.chunk_size}.")
        if not 0 < self.max_lr <= 1 or self.max_surprise_norm <= 0:
            raise ConfigError("memory.max_lr must be in (0, 1] and max_surprise_norm > 0.")


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _param(init, shape, names, rngs: nnx.Rngs, dtype=jnp.float32):
    init = nnx.with_partitioning(init, names, eager_sharding=False)
    return nnx.Param(init(rngs.params(), shape, dtype))


def per_example(param, batch_size: int):
    """A meta-learned initial state as every example's own float32 copy: [B, ...]."""
    return jnp.broadcast_to(param[...].astype(jnp.float32), (batch_size, *param.shape))


def _write(old, new, writes: Writes):
    """The fast-state update as the outer loss sees it (see the module docstring)."""
    if writes == "differentiable":
        return new
    return jax.tree.map(lambda o, n: o + jax.lax.stop_gradient(n - o), old, new)


def soft_clamp(tree, max_norm: float):
    """Rescale a pytree to norm max_norm * tanh(norm / max_norm): smooth, never above max_norm."""
    norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)) + 1e-12)
    scale = max_norm * jnp.tanh(norm / max_norm) / norm
    return jax.tree.map(lambda x: x * scale, tree)


def l2_normalize(x, axis=-1):
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + 1e-6)


class CausalConv(nnx.Module):
    """Depthwise causal 1-D conv: y_t = sum_j w_j x_{t-j}, identity at init."""

    def __init__(self, width: int, channels: int, rngs: nnx.Rngs):
        identity = lambda key, shape, dtype: jnp.zeros(shape, dtype).at[0].set(1.0)  # noqa: E731
        self.kernel = _param(identity, (width, channels), (None, None), rngs)

    def __call__(self, x, history=None):
        """x: [B, T, C] after `history` [B, width-1, C] (the previous inputs; default zeros)."""
        width, T = self.kernel.shape[0], x.shape[1]
        padded = self._after(x, history)  # [B, width-1+T, C]
        kernel = self.kernel[...].astype(x.dtype)
        return sum(kernel[j] * padded[:, width - 1 - j: width - 1 - j + T] for j in range(width))

    def history(self, x, history=None):
        """The last width-1 inputs of x [B, T, C] after `history`: a decode's state."""
        return self._after(x, history)[:, x.shape[1]:]  # [B, width-1, C]

    def _after(self, x, history):
        if history is None:
            return jnp.pad(x, ((0, 0), (self.kernel.shape[0] - 1, 0), (0, 0)))
        return jnp.concatenate([history.astype(x.dtype), x], axis=1)

    def step(self, x, history):
        """One token x [B, C] after `history` [B, width-1, C] (oldest first). -> (y, history')."""
        width = self.kernel.shape[0]
        window = jnp.concatenate([history, x[:, None]], axis=1)  # [B, width, C], newest last
        kernel = self.kernel[...].astype(x.dtype)
        return sum(kernel[j] * window[:, width - 1 - j] for j in range(width)), window[:, 1:]


def pad_to_chunks(x, chunk: int):
    """[B, T, ...] -> [B, N*chunk, ...] with N = ceil(T / chunk) (zeros at the end)."""
    T = x.shape[1]
    extra = -T % chunk if T else chunk
    return jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2))


def gated_scan(gates, seed, values):
    """state_n = gates_n * state_{n-1} + values_n from `seed`, by associative scan.

    gates: [U]; seed: pytree; values: pytree with leading U. Returns states [U+1, ...], entry 0
    the seed.
    """
    gates = jnp.concatenate([jnp.ones((1,), gates.dtype), gates])  # [U+1]
    values = jax.tree.map(lambda s, v: jnp.concatenate([s[None], v]), seed, values)

    def combine(a, b):
        (ga, ua), (gb, ub) = a, b
        expand = lambda g, x: g.reshape(g.shape + (1,) * (x.ndim - g.ndim))  # noqa: E731
        return ga * gb, jax.tree.map(lambda x, y: expand(gb, x) * x + y, ua, ub)

    _, states = jax.lax.associative_scan(combine, (gates, values))
    return states


# ---------------------------------------------------------------------------------------------
# Titans neural long-term memory (LMM)


def memory_mlp(weights, x):
    """M(x) = x + MLP(x): weights [(d_h, h), ..., (h, d_h)], GELU between layers; x: [..., d_h]."""
    h = x
    for i, w in enumerate(weights):
        h = h @ w
        if i < len(weights) - 1:
            h = jax.nn.gelu(h)
    return x + h


@flax.struct.dataclass
class TitansState:
    """Per-example fast state: memory weights and the momentum of the surprise (same shapes)."""

    weights: tuple  # per layer [B, H, d_in, d_out] float32
    momentum: tuple


def titans_loss(w, k, v, theta):
    """The theta-weighted associative loss of one token (the memory's inner objective)."""
    return theta * jnp.mean((memory_mlp(w, k) - v) ** 2)


@flax.struct.dataclass
class TitansChunk:
    """One chunk of one head's inputs (the scan's xs)."""

    q: jax.Array  # [C, d_h]
    k: jax.Array  # [C, d_h]
    v: jax.Array  # [C, d_h]
    theta: jax.Array  # [C] inner lr, 0 on pad
    eta: jax.Array  # [U] momentum gate
    alpha: jax.Array  # [U] forget gate
    real: jax.Array  # [U] the unit holds a real token


def titans_chunk(state: tuple, chunk: TitansChunk, *, cfg: MemoryConfig, writes: Writes):
    """Store one chunk (gradients at the chunk-start weights), then retrieve. One head.

    state: (weights, momentum) of this head. Returns (state', y [C, d_h]).
    """
    weights, momentum = state
    C, U = chunk.k.shape[0], chunk.eta.shape[0]
    unit = C // U
    grads = jax.vmap(jax.grad(titans_loss), in_axes=(None, 0, 0, 0))(
        weights, chunk.k, chunk.v, chunk.theta)  # per layer [C, d_in, d_out]
    grads = jax.tree.map(lambda g: g.reshape(U, unit, *g.shape[1:]).sum(1), grads)  # [U, ...]
    clamp = lambda g: soft_clamp(g, cfg.max_surprise_norm)  # noqa: E731
    surprise = jax.tree.map(jnp.negative, jax.vmap(clamp)(grads))  # one clamp per unit
    eta = jnp.where(chunk.real, chunk.eta, 1.0)  # a pad unit leaves momentum as it is
    moments = gated_scan(eta, momentum, surprise)  # [U+1, ...]
    step = jax.tree.map(lambda s: s[1:] * chunk.real.reshape(-1, *[1] * (s.ndim - 1)), moments)
    decay = jnp.where(chunk.real, 1.0 - chunk.alpha, 1.0)
    all_weights = gated_scan(decay, weights, step)  # [U+1, ...]: entry n = after n units
    new_state = _write((weights, momentum),
                       (jax.tree.map(lambda w: w[-1], all_weights),
                        jax.tree.map(lambda s: s[-1], moments)), writes)
    # token t reads the weights after every unit that ends before t (or at t: read_after_write)
    read_unit = (jnp.arange(C) + int(cfg.read_after_write)) // unit  # [C] in [0, U]
    if writes == "stop_gradient":
        all_weights = _write(jax.tree.map(lambda w: w[None], weights), all_weights, writes)
    read_weights = jax.tree.map(lambda w: w[read_unit], all_weights)  # per layer [C, d_in, d_out]
    y = jax.vmap(memory_mlp)(read_weights, chunk.q)  # [C, d_h]
    return new_state, y


@flax.struct.dataclass
class TitansDecode:
    """Per-example state of a token-by-token decode: what the chunked forward lets token t see.

    Gradients are taken at the chunk-start weights (`start`); reads see the weights after the
    chunk's complete units (`weights`); the current unit's summed gradient and pooled gate input
    wait in `grad` / `pooled` until the unit ends. Per layer [B, H, d_in, d_out] float32.
    """

    start: tuple
    weights: tuple
    momentum: tuple
    grad: tuple  # summed gradient of the current, unfinished unit
    pooled: jax.Array  # [B, d] sum of the unfinished unit's gate inputs
    unit_real: jax.Array  # [B] bool: the unfinished unit holds a real token
    conv: jax.Array  # [B, conv_width-1, 3d] the conv's last inputs
    position: jax.Array  # [B] int32 tokens since the chunk grid's origin


@flax.struct.dataclass
class TitansToken:
    """One token of one head (the decode step's inputs); gates as `TitansChunk` has them."""

    q: jax.Array  # [d_h]
    k: jax.Array
    v: jax.Array
    theta: jax.Array  # []
    eta: jax.Array  # [] the current unit's, used when it ends here
    alpha: jax.Array
    unit_real: jax.Array  # [] bool
    unit_end: jax.Array  # [] bool: this token completes its unit
    chunk_end: jax.Array  # [] bool: ... and its chunk


def titans_token(state: tuple, tok: TitansToken, *, cfg: MemoryConfig):
    """`titans_chunk` one token at a time: add its gradient, apply the unit when it ends. One head.

    state: (start, weights, momentum, grad). Returns (state', y [d_h]).
    """
    start, weights, momentum, grad = state
    grad = jax.tree.map(jnp.add, grad, jax.grad(titans_loss)(start, tok.k, tok.v, tok.theta))
    surprise = jax.tree.map(jnp.negative, soft_clamp(grad, cfg.max_surprise_norm))
    eta = jnp.where(tok.unit_real, tok.eta, 1.0)
    moved = jax.tree.map(lambda m, s: eta * m + s, momentum, surprise)
    decay = jnp.where(tok.unit_real, 1.0 - tok.alpha, 1.0)
    stepped = jax.tree.map(lambda w, m: decay * w + m * tok.unit_real, weights, moved)
    at_end = lambda new, old: jax.tree.map(  # noqa: E731
        lambda a, b: jnp.where(tok.unit_end, a, b), new, old)
    read = at_end(stepped, weights) if cfg.read_after_write else weights
    weights, momentum = at_end(stepped, weights), at_end(moved, momentum)
    grad = at_end(jax.tree.map(jnp.zeros_like, grad), grad)
    start = jax.tree.map(lambda w, s: jnp.where(tok.chunk_end, w, s), weights, start)
    return (start, weights, momentum, grad), memory_mlp(read, tok.q)


class TitansMemory(nnx.Module):
    """Titans LMM as a token mixer: x [B, T, d] -> y [B, T, d], with its fast state."""

    def __init__(self, cfg: MemoryConfig, d_model: int, *, writes: Writes, dtype, param_dtype,
                 rngs: nnx.Rngs):
        if d_model % cfg.heads:
            raise ConfigError(f"n_embd={d_model} must be divisible by memory.heads={cfg.heads}.")
        self.cfg, self.writes, self.dtype, self.d_model = cfg, writes, dtype, d_model
        H, dh = cfg.heads, d_model // cfg.heads
        linear = lambda d_out, names, std=0.02: nnx.Linear(  # noqa: E731
            d_model, d_out, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            kernel_init=nnx.with_partitioning(nnx.initializers.normal(std), names,
                                              eager_sharding=False))
        self.norm = nnx.RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = linear(3 * d_model, ("embed", "heads"))
        self.conv = CausalConv(cfg.conv_width, 3 * d_model, rngs)
        self.gates = nnx.Linear(d_model, 3 * H, dtype=jnp.float32, param_dtype=param_dtype,
                                rngs=rngs, kernel_init=nnx.initializers.zeros,
                                # theta 0.5 * max_lr, eta 0.88, alpha 0.018 at init
                                bias_init=lambda key, shape, dtype: jnp.repeat(
                                    jnp.array([0.0, 2.0, -4.0], dtype), H))
        self.retrieve_gate = linear(d_model, ("embed", "heads"))
        self.out = linear(d_model, ("heads", "embed"))
        dims = [dh] + [cfg.expansion * dh] * (cfg.depth - 1) + [dh]
        self.init_weights = nnx.List([
            _param(nnx.initializers.normal(1.0 / math.sqrt(a)), (H, a, b), (None, None, None), rngs)
            for a, b in zip(dims[:-1], dims[1:])])

    def init_fast(self, batch_size: int) -> TitansState:
        weights = tuple(per_example(w, batch_size) for w in self.init_weights)
        return TitansState(weights=weights, momentum=jax.tree.map(jnp.zeros_like, weights))

    def __call__(self, x, real, fast: TitansState):
        """x: [B, T, d]; real: [B, T] bool (pad tokens write nothing). -> (y, fast')."""
        h = self.norm(x)
        y, (weights, momentum) = self._chunks(h, *self._qkv(self.conv(self.qkv(h))), real,
                                              (fast.weights, fast.momentum))
        return self._output(y, h), TitansState(weights=weights, momentum=momentum)

    def prefill(self, x, real, fast: TitansState):
        """`__call__`'s outputs on a prompt x [B, T, d], and the decode state after its last token.

        Whole chunks go through the chunked scan; the partial chunk at the end, token by token.
        """
        B, T, d = x.shape
        T0 = T - T % self.cfg.chunk_size
        h = self.norm(x)
        pre = self.qkv(h)  # [B, T, 3d]
        q, k, v = self._qkv(self.conv(pre))  # [B, T, H, d_h] each
        ys, state = [], (fast.weights, fast.momentum)
        if T0:
            y, state = self._chunks(h[:, :T0], q[:, :T0], k[:, :T0], v[:, :T0], real[:, :T0], state)
            ys.append(y)
        weights, momentum = state
        dec = TitansDecode(start=weights, weights=weights, momentum=momentum,
                           grad=jax.tree.map(jnp.zeros_like, weights),
                           pooled=jnp.zeros((B, d), jnp.float32),
                           unit_real=jnp.zeros((B,), bool), conv=self.conv.history(pre),
                           position=jnp.full((B,), T0, jnp.int32))
        if T > T0:
            time_major = lambda a: jnp.moveaxis(a[:, T0:], 1, 0)  # noqa: E731
            dec, y = jax.lax.scan(lambda dec, tok: self._advance(dec, *tok), dec,
                                  tuple(map(time_major, (h.astype(jnp.float32), q, k, v, real))))
            ys.append(jnp.moveaxis(y, 0, 1))  # [B, T - T0, d]
        return self._output(jnp.concatenate(ys, axis=1), h), dec

    def start(self, fast: TitansState) -> TitansDecode:
        """`fast` as a decode state at the chunk grid's origin, with an empty conv history."""
        B = fast.weights[0].shape[0]
        return TitansDecode(start=fast.weights, weights=fast.weights, momentum=fast.momentum,
                            grad=jax.tree.map(jnp.zeros_like, fast.weights),
                            pooled=jnp.zeros((B, self.d_model), jnp.float32),
                            unit_real=jnp.zeros((B,), bool),
                            conv=jnp.zeros((B, self.cfg.conv_width - 1, 3 * self.d_model),
                                           self.dtype),
                            position=jnp.zeros((B,), jnp.int32))

    def extend(self, x, real, dec: TitansDecode):
        """Whole chunks x [B, T, d] after `dec` (at a chunk boundary). -> (y, dec').

        The chunked scan, continued with the conv's history: a sequence fed in pieces of whole
        chunks gets the outputs of one `__call__` on all of it (the online teach pass's path).
        """
        h = self.norm(x)
        pre = self.qkv(h)  # [B, T, 3d]
        y, (weights, momentum) = self._chunks(h, *self._qkv(self.conv(pre, dec.conv)), real,
                                              (dec.weights, dec.momentum))
        dec = dec.replace(start=weights, weights=weights, momentum=momentum,
                          conv=self.conv.history(pre, dec.conv), position=dec.position + x.shape[1])
        return self._output(y, h), dec

    def finish(self, dec: TitansDecode) -> TitansState:
        """The fast state `__call__` returns, from a decode state at a chunk boundary."""
        return TitansState(weights=dec.weights, momentum=dec.momentum)

    def decode(self, x, real, dec: TitansDecode):
        """One token x [B, d] (real [B] bool) after `dec`. -> (y [B, d], dec')."""
        h = self.norm(x)
        conv, history = self.conv.step(self.qkv(h), dec.conv)
        dec, y = self._advance(dec.replace(conv=history), h.astype(jnp.float32),
                               *self._qkv(conv), real)
        return self._output(y, h), dec

    def _qkv(self, conv):
        """Conv output [..., 3d] -> q, k (unit norm), v [..., H, d_h] float32."""
        H = self.cfg.heads
        qkv = jax.nn.silu(conv).astype(jnp.float32)
        q, k, v = jnp.moveaxis(qkv.reshape(*qkv.shape[:-1], 3, H, -1), -3, 0)
        return l2_normalize(q), l2_normalize(k), v

    def _output(self, y, h):
        """Memory reads y [..., d] float32 -> the mixer's output, gated by the normed input h."""
        y = y.astype(self.dtype) * jax.nn.sigmoid(self.retrieve_gate(h))
        return self.out(y)

    def _chunks(self, h, q, k, v, real, state):
        """The chunked scan: h [B, T, d]; q, k, v [B, T, H, d_h]. -> (y [B, T, d], state')."""
        cfg = self.cfg
        B, T, d = h.shape
        H, dh, C = cfg.heads, d // cfg.heads, cfg.chunk_size
        unit = 1 if cfg.gate_granularity == "token" else cfg.unit_size
        gate_in = pad_to_chunks(h.astype(jnp.float32), C)  # [B, Tp, d]
        realp = pad_to_chunks(real, C)  # [B, Tp]
        Tp = gate_in.shape[1]
        theta_logit, _, _ = jnp.split(self.gates(gate_in), 3, axis=-1)  # [B, Tp, H]
        pooled = gate_in.reshape(B, Tp // unit, unit, d).mean(2)  # [B, Tp/u, d]
        _, eta_logit, alpha_logit = jnp.split(self.gates(pooled), 3, axis=-1)  # [B, Tp/u, H]
        theta = jax.nn.sigmoid(theta_logit) * cfg.max_lr * realp[..., None]
        eta, alpha = jax.nn.sigmoid(eta_logit), jax.nn.sigmoid(alpha_logit)
        unit_real = realp.reshape(B, Tp // unit, unit).any(-1)  # [B, Tp/u]
        N, U = Tp // C, C // unit

        def chunks(a, per):  # [B, H, N*per, ...] -> [N, B, H, per, ...]
            a = a.reshape(B, H, N, per, *a.shape[3:])
            return jnp.moveaxis(a, 2, 0)

        heads_last = lambda a: jnp.broadcast_to(  # noqa: E731
            a, (B, a.shape[1], H)).transpose(0, 2, 1)  # [B, H, ...]
        per_head = lambda a: chunks(pad_to_chunks(a, C).transpose(0, 2, 1, 3), C)  # noqa: E731
        xs = TitansChunk(
            q=per_head(q), k=per_head(k), v=per_head(v),  # [N, B, H, C, d_h]
            theta=chunks(theta.transpose(0, 2, 1), C),  # [N, B, H, C]
            eta=chunks(eta.transpose(0, 2, 1), U),  # [N, B, H, U]
            alpha=chunks(alpha.transpose(0, 2, 1), U),
            real=chunks(heads_last(unit_real[..., None]), U),
        )
        step = jax.vmap(jax.vmap(lambda s, c: titans_chunk(s, c, cfg=cfg, writes=self.writes)))

        @jax.checkpoint
        def body(state, chunk):
            return step(state, chunk)  # over B, then H

        state, ys = jax.lax.scan(body, state, xs)
        y = jnp.moveaxis(ys, 0, 2).reshape(B, H, Tp, dh)[:, :, :T]  # [B, H, T, d_h]
        return y.transpose(0, 2, 1, 3).reshape(B, T, d), state

    def _advance(self, dec: TitansDecode, h, q, k, v, real):
        """One token through the memory: h [B, d] float32; q, k, v [B, H, d_h]; real [B].

        -> (dec', y [B, d] float32), a scan body's order."""
        cfg = self.cfg
        B, H, dh = q.shape
        unit = 1 if cfg.gate_granularity == "token" else cfg.unit_size
        pooled = dec.pooled + h
        theta_logit, _, _ = jnp.split(self.gates(h), 3, axis=-1)  # [B, H]
        _, eta_logit, alpha_logit = jnp.split(self.gates(pooled / unit), 3, axis=-1)  # [B, H]
        unit_real = dec.unit_real | real
        unit_end = dec.position % unit == unit - 1  # [B]
        per_head = lambda a: jnp.broadcast_to(a[:, None], (B, H))  # noqa: E731
        tok = TitansToken(
            q=q, k=k, v=v, theta=jax.nn.sigmoid(theta_logit) * cfg.max_lr * real[:, None],
            eta=jax.nn.sigmoid(eta_logit), alpha=jax.nn.sigmoid(alpha_logit),
            unit_real=per_head(unit_real), unit_end=per_head(unit_end),
            chunk_end=per_head(dec.position % cfg.chunk_size == cfg.chunk_size - 1))
        step = jax.vmap(jax.vmap(lambda s, t: titans_token(s, t, cfg=cfg)))  # over B, then H
        (start, weights, momentum, grad), y = step(
            (dec.start, dec.weights, dec.momentum, dec.grad), tok)  # y [B, H, d_h]
        dec = dec.replace(start=start, weights=weights, momentum=momentum, grad=grad,
                          pooled=jnp.where(unit_end[:, None], 0.0, pooled),
                          unit_real=unit_real & ~unit_end, position=dec.position + 1)
        return dec, y.reshape(B, H * dh)


# ---------------------------------------------------------------------------------------------
# Self-modifying Titans (HOPE's sequence mixer, spec §3)

# Adaptive memories in two groups of equal shapes, stacked so one vmap serves each group:
# "vectors" map d_h -> d_h (k, v, memory, and q with adaptive_q), "gates" map d_h -> 1.
VECTORS = ("k", "v", "memory", "q")
GATES = ("eta", "alpha")


def selfmod_apply(mem, x):
    """M(x) = [x +] gelu(x W2) W1: the skip only where input and output widths agree."""
    w2, w1 = mem
    out = jax.nn.gelu(x @ w2) @ w1
    return x + out if out.shape[-1] == x.shape[-1] else out


def apply_group(group, x):
    """Every memory of a group on x [C, d_h] -> [G, C, out]."""
    return jax.vmap(selfmod_apply, in_axes=(0, None))(group, x)


@flax.struct.dataclass
class SelfModState:
    """Per-example fast memories, float32: group -> (W2 [B, H, G, d_h, hid], W1 [B, H, G, hid, o]).

    `visible` is M_memory as the reads see it: it catches up with the written M_memory every
    memory_chunk_size tokens and at the end of each call.
    """

    memories: dict  # {"vectors": (W2, W1), "gates": (W2, W1)}
    visible: tuple  # (W2 [B, H, d_h, hid], W1 [B, H, hid, d_h])


@flax.struct.dataclass
class SelfModChunk:
    x: jax.Array  # [C, d_h] conv'd head input
    q: jax.Array  # [C, d_h] fixed-projection query (unused with adaptive_q)
    real: jax.Array  # [C] bool
    publish: jax.Array  # [] bool: M_memory becomes visible after this chunk


def selfmod_inputs(memories, x, q, real, *, cfg: MemoryConfig, eta_bias, alpha_bias):
    """k, v, q, eta, alpha of tokens x, q [C, d_h] (real [C]) generated by `memories`."""
    vectors = apply_group(memories["vectors"], x)  # [G, C, d_h]
    k, v = l2_normalize(vectors[0]), vectors[1]  # [C, d_h]
    q = l2_normalize(vectors[3] if cfg.adaptive_q else q)
    gates = apply_group(memories["gates"], x)[..., 0]  # [2, C]
    eta = cfg.max_lr * jax.nn.sigmoid(gates[0] + eta_bias)  # bounded inner lr
    alpha = jax.nn.sigmoid(gates[1] + alpha_bias)  # retention
    eta, alpha = jnp.where(real, eta, 0.0), jnp.where(real, alpha, 1.0)  # [C]
    return k, v, q, eta, alpha


def selfmod_grads(memories, k, v, *, cfg: MemoryConfig):
    """Per memory, per token: the clamped inner-loss gradient at `memories`, [G, C, ...]."""

    def inner_loss(mem, k_t, target):
        return jnp.sum((selfmod_apply(mem, k_t) - target) ** 2)

    def group_grads(group):
        vhat = apply_group(group, v)  # [G, C, out]: each memory makes its own target
        if cfg.stopgrad_vhat:
            vhat = jax.lax.stop_gradient(vhat)
        per_token = jax.vmap(jax.grad(inner_loss), in_axes=(None, 0, 0))
        grads = jax.vmap(per_token, in_axes=(0, None, 0))(group, k, vhat)  # [G, C, ...]
        clamp = lambda g: soft_clamp(g, cfg.max_surprise_norm)  # noqa: E731
        return jax.vmap(jax.vmap(clamp))(grads)

    return {name: group_grads(group) for name, group in memories.items()}


def dgd_write(memories, grads, t, k, eta, alpha, *, cfg: MemoryConfig):
    """Token t's write to every memory: grads from `selfmod_grads`; k [C, d_h]; eta, alpha [C]."""
    new = {}
    for name, (w2, w1) in memories.items():  # w2 [G, d_h, hid], w1 [G, hid, out]
        g2, g1 = (g[:, t] for g in grads[name])
        decayed = alpha[t] * w2
        if cfg.dgd_precond_target == "input":  # W2 (alpha I - eta k k^T), without a d x d
            decayed = decayed - eta[t] * jnp.einsum("d,gh->gdh", k[t], k[t] @ w2)
        new[name] = (decayed - eta[t] * g2, alpha[t] * w1 - eta[t] * g1)
    return new


def selfmod_chunk(state: tuple, chunk: SelfModChunk, *, cfg: MemoryConfig, writes: Writes,
                  eta_bias, alpha_bias):
    """Generate k, v, eta, alpha, targets and reads at the chunk-boundary state; then DGD."""
    memories, visible = state
    k, v, q, eta, alpha = selfmod_inputs(memories, chunk.x, chunk.q, chunk.real, cfg=cfg,
                                         eta_bias=eta_bias, alpha_bias=alpha_bias)
    y = jax.vmap(selfmod_apply, in_axes=(None, 0))(visible, q)  # [C, d_h]
    grads = selfmod_grads(memories, k, v, cfg=cfg)
    written, _ = jax.lax.scan(  # token by token, state-only carry
        lambda mems, t: (dgd_write(mems, grads, t, k, eta, alpha, cfg=cfg), None),
        memories, jnp.arange(k.shape[0]))
    written = _write(memories, written, writes)
    memory = jax.tree.map(lambda w: w[2], written["vectors"])
    visible = jax.tree.map(lambda new, old: jnp.where(chunk.publish, new, old), memory, visible)
    return (written, visible), y


@flax.struct.dataclass
class SelfModDecode:
    """Per-example state of a token-by-token decode (see `TitansDecode`).

    A chunk's k, v, eta, alpha, targets and gradients come from the chunk-start memories
    (`start`); the DGD writes of its tokens so far are in `memories`; reads use `visible`.
    """

    start: dict
    memories: dict
    visible: tuple
    conv: jax.Array  # [B, conv_width-1, d] the conv's last inputs
    position: jax.Array  # [B] int32 tokens since the chunk grid's origin


@flax.struct.dataclass
class SelfModToken:
    x: jax.Array  # [d_h] conv'd head input
    q: jax.Array  # [d_h]
    real: jax.Array  # [] bool
    chunk_end: jax.Array  # [] bool: the chunk's writes become the next chunk's start
    publish: jax.Array  # [] bool: ... and M_memory becomes visible


def selfmod_token(state: tuple, tok: SelfModToken, *, cfg: MemoryConfig, eta_bias, alpha_bias):
    """`selfmod_chunk` one token at a time. state: (start, memories, visible) of one head."""
    start, memories, visible = state
    k, v, q, eta, alpha = selfmod_inputs(start, tok.x[None], tok.q[None], tok.real[None],
                                         cfg=cfg, eta_bias=eta_bias, alpha_bias=alpha_bias)
    y = selfmod_apply(visible, q[0])  # [d_h]
    grads = selfmod_grads(start, k, v, cfg=cfg)
    memories = dgd_write(memories, grads, 0, k, eta, alpha, cfg=cfg)
    start = jax.tree.map(lambda w, s: jnp.where(tok.chunk_end, w, s), memories, start)
    memory = jax.tree.map(lambda w: w[2], memories["vectors"])
    visible = jax.tree.map(lambda w, old: jnp.where(tok.publish, w, old), memory, visible)
    return (start, memories, visible), y


class SelfModTitans(nnx.Module):
    """Self-referential Titans: k, v, eta, alpha (and q) from memories that rewrite themselves."""

    def __init__(self, cfg: MemoryConfig, d_model: int, *, writes: Writes, dtype, param_dtype,
                 rngs: nnx.Rngs):
        if d_model % cfg.heads:
            raise ConfigError(f"n_embd={d_model} must be divisible by memory.heads={cfg.heads}.")
        self.cfg, self.writes, self.dtype, self.d_model = cfg, writes, dtype, d_model
        H, dh = cfg.heads, d_model // cfg.heads
        hid = cfg.expansion * dh
        linear = lambda d_out, names: nnx.Linear(  # noqa: E731
            d_model, d_out, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), names,
                                              eager_sharding=False))
        self.norm = nnx.RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.inp = linear(2 * d_model, ("embed", "heads"))  # [x_in | q]
        self.conv = CausalConv(cfg.conv_width, d_model, rngs)
        self.out = linear(d_model, ("heads", "embed"))
        self.eta_bias = nnx.Param(jnp.zeros((H,)))
        self.alpha_bias = nnx.Param(jnp.full((H,), 4.0, jnp.float32))  # retention ~0.98 at init
        vectors = VECTORS if cfg.adaptive_q else VECTORS[:3]
        normal = nnx.initializers.normal
        group = lambda n, out: nnx.List([  # noqa: E731
            _param(normal(1.0 / math.sqrt(dh)), (H, n, dh, hid), (None,) * 4, rngs),
            _param(normal(0.1 / math.sqrt(hid)), (H, n, hid, out), (None,) * 4, rngs)])
        self.init_memories = nnx.Dict({"vectors": group(len(vectors), dh),
                                       "gates": group(len(GATES), 1)})

    def init_fast(self, batch_size: int) -> SelfModState:
        memories = {name: (per_example(w2, batch_size), per_example(w1, batch_size))
                    for name, (w2, w1) in self.init_memories.items()}
        visible = jax.tree.map(lambda w: w[:, :, 2], memories["vectors"])  # M_memory
        return SelfModState(memories=memories, visible=visible)

    def __call__(self, x, real, fast: SelfModState):
        """x: [B, T, d]; real: [B, T] bool. -> (y [B, T, d], fast')."""
        x_in, q = jnp.split(self.inp(self.norm(x)), 2, axis=-1)  # [B, T, d] each
        y, fast = self._chunks(self.conv(x_in).astype(jnp.float32), q.astype(jnp.float32), real,
                               fast, publish_last=True)
        return self.out(y.astype(self.dtype)), fast

    def prefill(self, x, real, fast: SelfModState):
        """`__call__`'s outputs on a prompt x [B, T, d], and the decode state after its last token.

        Whole chunks go through the chunked scan (M_memory published on its own period only,
        not at the prompt's end); the partial chunk at the end, token by token.
        """
        B, T, _ = x.shape
        T0 = T - T % self.cfg.chunk_size
        x_in, q = jnp.split(self.inp(self.norm(x)), 2, axis=-1)  # [B, T, d] each
        conv, q = self.conv(x_in).astype(jnp.float32), q.astype(jnp.float32)
        ys, state = [], fast
        if T0:
            y, state = self._chunks(conv[:, :T0], q[:, :T0], real[:, :T0], fast,
                                    publish_last=False)
            ys.append(y)
        dec = SelfModDecode(start=state.memories, memories=state.memories, visible=state.visible,
                            conv=self.conv.history(x_in), position=jnp.full((B,), T0, jnp.int32))
        if T > T0:
            time_major = lambda a: jnp.moveaxis(a[:, T0:], 1, 0)  # noqa: E731
            dec, y = jax.lax.scan(lambda dec, tok: self._advance(dec, *tok), dec,
                                  tuple(map(time_major, (conv, q, real))))
            ys.append(jnp.moveaxis(y, 0, 1))  # [B, T - T0, d]
        return self.out(jnp.concatenate(ys, axis=1).astype(self.dtype)), dec

    def start(self, fast: SelfModState) -> SelfModDecode:
        """`fast` as a decode state at the chunk grid's origin, with an empty conv history."""
        B = fast.visible[0].shape[0]
        return SelfModDecode(start=fast.memories, memories=fast.memories, visible=fast.visible,
                             conv=jnp.zeros((B, self.cfg.conv_width - 1, self.d_model),
                                            self.dtype),
                             position=jnp.zeros((B,), jnp.int32))

    def extend(self, x, real, dec: SelfModDecode):
        """Whole chunks x [B, T, d] after `dec` (at a chunk boundary). -> (y, dec').

        As `TitansMemory.extend`: M_memory is published on its own period of the global grid
        (`dec.position`), not at the end of each piece.
        """
        x_in, q = jnp.split(self.inp(self.norm(x)), 2, axis=-1)  # [B, T, d] each
        y, state = self._chunks(self.conv(x_in, dec.conv).astype(jnp.float32),
                                q.astype(jnp.float32), real,
                                SelfModState(memories=dec.memories, visible=dec.visible),
                                publish_last=False, position=dec.position)
        dec = dec.replace(start=state.memories, memories=state.memories, visible=state.visible,
                          conv=self.conv.history(x_in, dec.conv),
                          position=dec.position + x.shape[1])
        return self.out(y.astype(self.dtype)), dec

    def finish(self, dec: SelfModDecode) -> SelfModState:
        """The fast state `__call__` returns (M_memory published), from a chunk boundary."""
        visible = jax.tree.map(lambda w: w[:, :, 2], dec.memories["vectors"])
        return SelfModState(memories=dec.memories, visible=visible)

    def decode(self, x, real, dec: SelfModDecode):
        """One token x [B, d] (real [B] bool) after `dec`. -> (y [B, d], dec')."""
        x_in, q = jnp.split(self.inp(self.norm(x)), 2, axis=-1)  # [B, d] each
        conv, history = self.conv.step(x_in, dec.conv)
        dec, y = self._advance(dec.replace(conv=history), conv.astype(jnp.float32),
                               q.astype(jnp.float32), real)
        return self.out(y.astype(self.dtype)), dec

    def _chunks(self, x, q, real, fast: SelfModState, *, publish_last: bool, position=None):
        """The chunked scan over conv'd inputs x, q [B, T, d] float32. -> (y [B, T, d], fast').

        `position` [B]: tokens before x on the chunk grid (default 0), for M_memory's period.
        """
        cfg = self.cfg
        B, T, d = x.shape
        H, dh, C = cfg.heads, d // cfg.heads, cfg.chunk_size

        def chunks(a):  # [B, T, d] -> [N, B, H, C, d_h]
            a = pad_to_chunks(a, C)
            N = a.shape[1] // C
            return a.reshape(B, N, C, H, dh).transpose(1, 0, 3, 2, 4)

        xs_x, xs_q = chunks(x), chunks(q)
        N = xs_x.shape[0]
        realp = pad_to_chunks(real, C).reshape(B, N, C).transpose(1, 0, 2)  # [N, B, C]
        every = cfg.memory_chunk_size // C
        first = jnp.zeros((B,), jnp.int32) if position is None else position // C
        index = first[None, :] + jnp.arange(N)[:, None]  # [N, B] chunk on the global grid
        publish = (index % every == every - 1) | (publish_last & (jnp.arange(N) == N - 1))[:, None]
        xs = SelfModChunk(x=xs_x, q=xs_q,
                          real=jnp.broadcast_to(realp[:, :, None], (N, B, H, C)),
                          publish=jnp.broadcast_to(publish[:, :, None], (N, B, H)))
        one = lambda s, c, eb, ab: selfmod_chunk(s, c, cfg=cfg, writes=self.writes,  # noqa: E731
                                                 eta_bias=eb, alpha_bias=ab)
        heads = jax.vmap(one, in_axes=(0, 0, 0, 0))  # over H (biases are per head)
        step = jax.vmap(heads, in_axes=(0, 0, None, None))  # over B

        @jax.checkpoint
        def body(state, chunk):
            return step(state, chunk, self.eta_bias[...], self.alpha_bias[...])

        (memories, visible), ys = jax.lax.scan(body, (fast.memories, fast.visible), xs)
        y = ys.transpose(1, 0, 3, 2, 4).reshape(B, N * C, d)[:, :T]  # [B, T, d]
        return y, SelfModState(memories=memories, visible=visible)

    def _advance(self, dec: SelfModDecode, x, q, real):
        """One token: conv'd x, q [B, d] float32; real [B]. -> (dec', y [B, d] float32)."""
        cfg = self.cfg
        B, d = x.shape
        H, C = cfg.heads, cfg.chunk_size
        chunk_end = dec.position % C == C - 1  # [B]
        every = cfg.memory_chunk_size // C
        publish = chunk_end & (dec.position // C % every == every - 1)
        per_head = lambda a: jnp.broadcast_to(a[:, None], (B, H))  # noqa: E731
        tok = SelfModToken(x=x.reshape(B, H, -1), q=q.reshape(B, H, -1), real=per_head(real),
                           chunk_end=per_head(chunk_end), publish=per_head(publish))
        one = lambda s, t, eb, ab: selfmod_token(s, t, cfg=cfg, eta_bias=eb,  # noqa: E731
                                                 alpha_bias=ab)
        step = jax.vmap(jax.vmap(one), in_axes=(0, 0, None, None))  # over B, then H
        (start, memories, visible), y = step((dec.start, dec.memories, dec.visible), tok,
                                             self.eta_bias[...], self.alpha_bias[...])
        dec = dec.replace(start=start, memories=memories, visible=visible,
                          position=dec.position + 1)
        return dec, y.reshape(B, d)
