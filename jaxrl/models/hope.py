"""HOPE (Nested Learning): a token mixer with fast-weight memory, then a Continuum Memory System.

    tokens -> embed -> [x + mixer(x); CMS(x)] x n_layer -> LayerNorm -> tied head -> logits

`mixer` picks the block: "selfmod" (HOPE: self-modifying Titans, no attention), "attention"
(HOPE-attention: GPT-2's causal softmax attention, with learned positions), or "titans" (the
Titans LMM alone). The interface is GPT-2's: `model(tokens, attention_mask, deterministic=...,
rngs=...) -> logits [B, T, embedding_rows]`, so the SFT recipe's `lm_loss` trains it. Every
call starts each example from the meta-learned initial fast state (the slow parameters); pass
`fast=model.init_fast(B)` (or a state a previous call returned) to get `(logits, fast')` and
carry the memories across calls. `save_pretrained` / `from_pretrained` write and read the
export the evaluations load (config.json with model_type "hope" + model.safetensors).

Generation (`generate`) is a recurrent-state decoder: `HOPE.prefill` runs the prompt once and
returns a `HopeDecode` (per layer the mixer's decode state: its memories at the current chunk's
start plus the chunk's progress and the conv's last inputs, or the attention variant's KV cache;
and the CMS levels with their pending gradients), and `HOPE.decode` costs one token's forward.
Its logits equal those of the full forward on the whole window; `generate(..., recompute=True)`
re-runs that forward per token instead (O(T^2), the reference the tests hold the decoder to).

`cms.objective: teach` (spec §4.2, §6.2) makes every call an online pass: the sequence is cut
into online chunks of `cms.teach_chunk` tokens (default the fastest CMS period), run one after
another in a `lax.scan`; each chunk goes through every block (the mixers continue from the
previous chunk exactly: `extend`, whole mixer chunks, conv history carried; attention through
a KV cache), then its per-example LM loss (mean CE of the chunk's supervised pairs, position t
supervised by token t+1 of the call) is differentiated by `jax.vjp` with respect to the CMS
weights the chunk read. That gradient, 2 J^T delta with delta = d(loss)/d(level output), a
constant (mode S), is what each level writes with (`CMS.teach`). Causal: the write after a
chunk uses its tokens and targets, i.e. up to the next chunk's first token, and only later
positions read it. The outer loss is `sft.lm_loss` on the logits, unchanged. The recurrent
decoder does not make teach writes yet (`prefill` says so; `recompute=True` does).

`cms.state: persistent` is the recipe's (`recipes/sft_hope.py`): `empty_memory`, `recall`
(a sequence's fast state from the carried memory), `remember` (the next memory: the batch mean
of the CMS states) and `absorb` (fold it into the initial weights for an export).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl.core.config import ConfigError, build
from jaxrl.models import gpt2
from jaxrl.models.cms import CMS, CMSConfig, CMSMemory
from jaxrl.models.titans import MemoryConfig, SelfModTitans, TitansMemory, Writes, pad_to_chunks

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class HopeConfig:
    """Architecture, numerics and the spec's open questions (§9) as flags."""

    vocab_size: int = gpt2.GPT2_VOCAB_SIZE + 1  # + pad row
    pad_id: int = gpt2.PAD_ID
    pad_vocab_to: int = 128
    n_positions: int = 1024  # the attention variant's learned positions; others are unbounded
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4  # attention variant
    mixer: Literal["selfmod", "attention", "titans"] = "selfmod"
    writes: Writes = "differentiable"  # mode D (meta-learning) or mode S (stop-gradient writes)
    memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)
    cms: CMSConfig = dataclasses.field(default_factory=CMSConfig)
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; fast state and scans are float32 always

    def __post_init__(self):
        self.validate()

    def validate(self):
        for field in ("param_dtype", "dtype"):
            if getattr(self, field) not in _DTYPES:
                raise ConfigError(f"{field}={getattr(self, field)!r}; choose one of "
                                  f"{sorted(_DTYPES)}.")
        if self.n_embd % self.memory.heads or self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} must be divisible by memory.heads and n_head.")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ConfigError(f"pad_id={self.pad_id} must index the embedding "
                              f"(vocab_size={self.vocab_size}).")
        self.memory.validate()
        self.cms.validate()
        grain = {"selfmod": self.memory.chunk_size, "titans": self.memory.chunk_size,
                 "attention": 1}[self.mixer]
        if self.cms.objective == "teach" and self.cms.online_chunk % grain:
            raise ConfigError(f"cms.teach_chunk={self.cms.online_chunk} (0: the fastest period) "
                              f"must be a multiple of memory.chunk_size={grain}: the online teach "
                              "pass feeds the mixer whole chunks.")

    @property
    def embedding_rows(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to


@flax.struct.dataclass
class HopeState:
    """The model's fast state: per layer, the mixer's memory and the CMS levels (batch-leading)."""

    mixer: tuple  # per layer TitansState | SelfModState | None (attention)
    cms: tuple  # per layer CMSState


@flax.struct.dataclass
class HopeDecode:
    """Everything the next token's forward depends on (see the module docstring)."""

    mixer: tuple  # per layer TitansDecode | SelfModDecode | (keys, values) [B, H, S, D]
    cms: tuple  # per layer CMSState, never flushed
    valid: jax.Array  # [B, S] bool: slots holding real tokens (attention's keys and positions)
    index: jax.Array  # [] int32: the next token's slot


@flax.struct.dataclass
class _Online:
    """The online teach pass's carry, per layer: the mixer's decode state (or KV cache), CMS."""

    mixer: tuple
    cms: tuple


class HopeBlock(nnx.Module):
    """x + mixer(x), then CMS(x). -> (x, (mixer state, CMS state))."""

    def __init__(self, cfg: HopeConfig, rngs: nnx.Rngs):
        dtype, param_dtype = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
        kw = dict(writes=cfg.writes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mixer_kind = cfg.mixer
        if cfg.mixer == "attention":
            attn_cfg = gpt2.GPT2Config(n_embd=cfg.n_embd, n_head=cfg.n_head, n_layer=cfg.n_layer,
                                       vocab_size=cfg.vocab_size, pad_id=cfg.pad_id,
                                       dtype=cfg.dtype, param_dtype=cfg.param_dtype)
            self.ln = gpt2._layer_norm(attn_cfg, rngs)
            self.mixer = gpt2.Attention(attn_cfg, rngs)
        else:
            module = SelfModTitans if cfg.mixer == "selfmod" else TitansMemory
            self.mixer = module(cfg.memory, cfg.n_embd, **kw)
        self.cms = CMS(cfg.cms, cfg.n_embd, **kw)

    def init_fast(self, batch_size: int):
        mixer = None if self.mixer_kind == "attention" else self.mixer.init_fast(batch_size)
        return mixer, self.cms.init_fast(batch_size)

    def __call__(self, x, real, attend, fast):
        mixer_fast, cms_fast = fast
        if self.mixer_kind == "attention":
            h = self.mixer(self.ln(x), attend, deterministic=True, rngs=None)
        else:
            h, mixer_fast = self.mixer(x, real, mixer_fast)
        x, cms_fast = self.cms(x + h, real, cms_fast)
        return x, (mixer_fast, cms_fast)

    def online(self, x, real, attend, index, mixer_state, cms_weights):
        """One online chunk x [B, C, d] at slot `index`, the CMS read at `cms_weights` (what the
        teach pass differentiates the chunk's loss by). -> (x, mixer_state')."""
        if self.mixer_kind == "attention":
            h, mixer_state = self.mixer(self.ln(x), attend, deterministic=True, rngs=None,
                                        cached=(*mixer_state, index))
        else:
            h, mixer_state = self.mixer.extend(x, real, mixer_state)
        return self.cms.read(x + h, cms_weights), mixer_state

    def prefill(self, x, real, attend, fast, max_len: int):
        """`__call__` on a prompt, returning decode states; attention writes slots 0..P-1 of S."""
        mixer_fast, cms_fast = fast
        if self.mixer_kind == "attention":
            cfg = self.mixer.cfg
            empty = jnp.zeros((x.shape[0], cfg.n_head, max_len, cfg.head_dim), x.dtype)
            h, mixer_fast = self.mixer(self.ln(x), attend, deterministic=True, rngs=None,
                                       cached=(empty, empty, 0))
        else:
            h, mixer_fast = self.mixer.prefill(x, real, mixer_fast)
        x, cms_fast = self.cms.prefill(x + h, real, cms_fast)
        return x, (mixer_fast, cms_fast)

    def decode(self, x, real, attend, index, fast):
        """One token x [B, d] (attend [B, 1, S] for attention, written at slot `index`)."""
        mixer_fast, cms_fast = fast
        if self.mixer_kind == "attention":
            keys, values = mixer_fast
            h, mixer_fast = self.mixer(self.ln(x)[:, None], attend, deterministic=True, rngs=None,
                                       cached=(keys, values, index))
            h = h[:, 0]
        else:
            h, mixer_fast = self.mixer.decode(x, real, mixer_fast)
        x, cms_fast = self.cms.decode(x + h, real, cms_fast)
        return x, (mixer_fast, cms_fast)


class HOPE(nnx.Module):
    """HOPE language model with tied input/output embeddings and GPT-2's call interface."""

    def __init__(self, cfg: HopeConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, param_dtype = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
        embed = lambda rows, names: nnx.Embed(  # noqa: E731
            rows, cfg.n_embd, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), names,
                                                 eager_sharding=False))
        self.wte = embed(cfg.embedding_rows, ("vocab", "embed"))
        self.wpe = embed(cfg.n_positions, (None, "embed")) if cfg.mixer == "attention" else None
        self.h = nnx.List([HopeBlock(cfg, rngs) for _ in range(cfg.n_layer)])
        self.ln_f = nnx.LayerNorm(cfg.n_embd, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def init_fast(self, batch_size: int) -> HopeState:
        """Each example's fast state at a sequence start: the meta-learned initial weights."""
        states = [block.init_fast(batch_size) for block in self.h]
        return HopeState(mixer=tuple(s[0] for s in states), cms=tuple(s[1] for s in states))

    def __call__(self, tokens, attention_mask=None, *, deterministic: bool = True, rngs=None,
                 fast: HopeState | None = None):
        """Next-token logits [B, T, embedding_rows] float32; with `fast`, also the new fast state.

        `deterministic` and `rngs` are accepted for GPT-2's interface; HOPE has no dropout.
        """
        del deterministic, rngs
        B, T = tokens.shape
        x, real = self._embed(tokens, attention_mask)
        state = self.init_fast(B) if fast is None else fast
        if self.cfg.cms.objective == "teach":
            logits, state = self._teach(tokens, x, real, state)
            return logits if fast is None else (logits, state)
        attend = None
        if self.cfg.mixer == "attention":
            causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]  # [T, T]
            attend = causal[None] & real[:, None, :]  # [B, T, T]
        mixers, cmss = [], []
        for block, mixer_fast, cms_fast in zip(self.h, state.mixer, state.cms):
            x, (mixer_fast, cms_fast) = block(x, real, attend, (mixer_fast, cms_fast))
            mixers.append(mixer_fast)
            cmss.append(cms_fast)
        logits = self._logits(x)
        if fast is None:
            return logits
        return logits, HopeState(mixer=tuple(mixers), cms=tuple(cmss))

    def _teach(self, tokens, x, real, state: HopeState):
        """The online teach pass (module docstring): chunk by chunk, forward, the chunk's
        per-example LM loss, its gradient to each CMS level's weights (jax.vjp), the writes.

        Position t is supervised by token t+1 of the call (T-1 pairs; the last token's target
        is not in the call). -> (logits [B, T, V], fast').
        """
        cfg = self.cfg
        B, T, d = x.shape
        C = cfg.cms.online_chunk
        N = -(-T // C)
        pairs = lambda a: jnp.pad(a, ((0, 0), (0, N * C - T + 1)))  # noqa: E731  -> [B, N*C]
        targets = pairs(tokens[:, 1:])
        supervised = pairs(real[:, 1:] & real[:, :-1]).astype(jnp.float32)
        x, real = pad_to_chunks(x, C), pad_to_chunks(real, C)  # [B, N*C, ...]
        attention = cfg.mixer == "attention"
        if attention:
            shape = (B, cfg.n_head, N * C, cfg.n_embd // cfg.n_head)
            mixers = tuple((jnp.zeros(shape, x.dtype), jnp.zeros(shape, x.dtype)) for _ in self.h)
        else:
            mixers = tuple(block.mixer.start(m) for block, m in zip(self.h, state.mixer))
        by_chunk = lambda a: jnp.moveaxis(a.reshape(B, N, C, *a.shape[2:]), 1, 0)  # noqa: E731

        def body(carry: _Online, xs):
            c, xc, rc, tc, sc = xs  # [B, C, ...] each
            index = c * C
            attend = None
            if attention:  # [B, C, N*C]: earlier slots holding real tokens
                causal = jnp.arange(N * C)[None, :] <= (index + jnp.arange(C))[:, None]
                attend = causal[None] & real[:, None, :]

            def chunk_loss(weights):  # per layer, per level (w_in, w_out) [B, ...]
                h, mixers = xc, []
                for block, m, w in zip(self.h, carry.mixer, weights):
                    h, m = block.online(h, rc, attend, index, m, w)
                    mixers.append(m)
                logits = self._logits(h)  # [B, C, V]
                picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
                ce = jax.nn.logsumexp(logits, axis=-1) - picked  # [B, C]
                per_example = (ce * sc).sum(1) / jnp.maximum(sc.sum(1), 1.0)
                return per_example.sum(), (logits, tuple(mixers))

            weights = tuple(s.weights for s in carry.cms)
            _, pullback, (logits, mixers) = jax.vjp(chunk_loss, weights, has_aux=True)
            grads = jax.lax.stop_gradient(pullback(jnp.ones(()))[0])  # delta is a constant
            seen = jnp.minimum(C, T - index)  # real slots of this chunk (the last may be short)
            cms = tuple(block.cms.teach(s, g, seen, last=c == N - 1)
                        for block, s, g in zip(self.h, carry.cms, grads))
            return _Online(mixer=mixers, cms=cms), logits

        carry, logits = jax.lax.scan(
            body, _Online(mixer=mixers, cms=state.cms),
            (jnp.arange(N), *map(by_chunk, (x, real, targets, supervised))))
        logits = jnp.moveaxis(logits, 0, 1).reshape(B, N * C, -1)[:, :T]
        mixer = tuple(None if attention else block.mixer.finish(m)
                      for block, m in zip(self.h, carry.mixer))
        return logits, HopeState(mixer=mixer, cms=carry.cms)

    def empty_memory(self) -> tuple[CMSMemory, ...]:
        """`cms.state: persistent`'s memory before any token: per layer, a zero offset."""
        return tuple(block.cms.empty_memory() for block in self.h)

    def recall(self, memory: tuple[CMSMemory, ...], batch_size: int) -> HopeState:
        """A sequence's fast state in persistent mode: fresh mixers, the CMS from `memory`."""
        fresh = self.init_fast(batch_size)
        cms = tuple(block.cms.recall(m, batch_size) for block, m in zip(self.h, memory))
        return fresh.replace(cms=cms)

    def remember(self, fast: HopeState) -> tuple[CMSMemory, ...]:
        """The memory the next sequence recalls: the batch mean of the CMS states (constant)."""
        return tuple(block.cms.remember(s) for block, s in zip(self.h, fast.cms))

    def absorb(self, memory: tuple[CMSMemory, ...]) -> None:
        """Fold `memory` into the CMS initial weights (in place): an export that starts from it."""
        for block, m in zip(self.h, memory):
            for ws, offsets in zip(block.cms.init_weights, m.offset):
                for w, offset in zip(ws, offsets):
                    w.set_value((w[...].astype(jnp.float32) + offset).astype(w[...].dtype))

    def _embed(self, tokens, attention_mask):
        """-> (token embeddings [B, T, d], real-token mask [B, T]); the attention variant adds
        learned positions counted over real tokens only (left padding takes none)."""
        real = tokens != self.cfg.pad_id
        if attention_mask is not None:
            real &= attention_mask.astype(bool)
        x = self.wte(tokens)
        if self.cfg.mixer == "attention":
            positions = jnp.maximum(jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1, 0)
            x = x + self.wpe(positions)
        return x, real

    def prefill(self, tokens, attention_mask=None, *, max_len: int):
        """Run a prompt [B, P] from the initial fast state, for a decode of up to `max_len` slots.

        -> (logits [B, P, embedding_rows], HopeDecode): the logits of `__call__`.
        """
        if self.cfg.cms.objective == "teach":
            raise ConfigError("the recurrent decoder does not make teach writes (cms.objective="
                              "teach) yet; use generate(..., recompute=True).")
        B, P = tokens.shape
        x, real = self._embed(tokens, attention_mask)
        state = self.init_fast(B)
        valid = jnp.zeros((B, max_len), bool).at[:, :P].set(real)
        attend = None
        if self.cfg.mixer == "attention":
            causal = jnp.arange(max_len)[None, :] <= jnp.arange(P)[:, None]  # [P, S]
            attend = causal[None] & valid[:, None, :]  # [B, P, S]
        mixers, cmss = [], []
        for block, mixer_fast, cms_fast in zip(self.h, state.mixer, state.cms):
            x, (mixer_fast, cms_fast) = block.prefill(x, real, attend, (mixer_fast, cms_fast),
                                                      max_len)
            mixers.append(mixer_fast)
            cmss.append(cms_fast)
        decode = HopeDecode(mixer=tuple(mixers), cms=tuple(cmss), valid=valid,
                            index=jnp.asarray(P, jnp.int32))
        return self._logits(x), decode

    def decode(self, token, state: HopeDecode):
        """One token [B] after `state` -> (next-token logits [B, embedding_rows], state')."""
        cfg = self.cfg
        real = token != cfg.pad_id
        valid = jax.lax.dynamic_update_slice(state.valid, real[:, None], (0, state.index))
        x = self.wte(token)  # [B, d]
        attend = None
        if cfg.mixer == "attention":
            before = state.valid.sum(axis=1, dtype=jnp.int32)  # real tokens so far
            x = x + self.wpe(jnp.maximum(before + real - 1, 0))
            attend = ((jnp.arange(valid.shape[1]) <= state.index)[None] & valid)[:, None]
        mixers, cmss = [], []
        for block, mixer_fast, cms_fast in zip(self.h, state.mixer, state.cms):
            x, (mixer_fast, cms_fast) = block.decode(x, real, attend, state.index,
                                                     (mixer_fast, cms_fast))
            mixers.append(mixer_fast)
            cmss.append(cms_fast)
        return self._logits(x), HopeDecode(mixer=tuple(mixers), cms=tuple(cmss), valid=valid,
                                           index=state.index + 1)

    def _logits(self, x):
        """Tied-head logits [..., embedding_rows] float32; pad and padding rows never predicted."""
        cfg = self.cfg
        logits = self.wte.attend(self.ln_f(x)).astype(jnp.float32)
        ids = jnp.arange(cfg.embedding_rows)
        return jnp.where((ids == cfg.pad_id) | (ids >= cfg.vocab_size), -1e9, logits)


def parameter_count(model: nnx.Module) -> int:
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


MODEL_TYPE = "hope"  # config.json's model_type: what `eval_lm` dispatches on


def save_pretrained(model: HOPE, path: str | Path, *, tokenizer: str = "gpt2") -> None:
    """Write `model` to a directory: config.json (HopeConfig, tokenizer) + model.safetensors.

    Tensors are named by their NNX path ("h.0.mixer.inp.kernel"), stored float32; HOPE has no
    Hugging Face class, so this layout is ours. `from_pretrained` reads it back.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    tensors = {".".join(map(str, key)): np.ascontiguousarray(
        np.asarray(jax.device_get(var.get_value()), np.float32)) for key, var in flat}
    save_file(tensors, path / "model.safetensors")
    config = {"model_type": MODEL_TYPE, "tokenizer": tokenizer,
              "config": dataclasses.asdict(model.cfg)}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def is_pretrained(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == MODEL_TYPE


def from_pretrained(path: str | Path) -> tuple[HOPE, str]:
    """(model, tokenizer spec) of a `save_pretrained` directory; every tensor must match."""
    from safetensors.numpy import load_file

    path = Path(path)
    saved = json.loads((path / "config.json").read_text())
    if saved.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"{path}: config.json says model_type={saved.get('model_type')!r}, "
                          f"not {MODEL_TYPE!r}; is this a GPT-2 export (gpt2.from_pretrained)?")
    cfg = build(HopeConfig, saved["config"], source=str(path / "config.json"))
    model = nnx.eval_shape(lambda: HOPE(cfg, rngs=nnx.Rngs(0)))  # shapes only: no random init
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    tensors = load_file(path / "model.safetensors")
    names = {".".join(map(str, key)) for key, _ in flat}
    if missing := sorted(names - set(tensors)) + sorted(set(tensors) - names):
        raise ConfigError(f"{path}: model.safetensors and config.json disagree on {missing[:3]} "
                          f"({len(missing)} names); re-export the model with save_pretrained.")
    for key, var in flat:
        value = tensors[".".join(map(str, key))]
        if value.shape != var.shape:
            raise ConfigError(f"{path}: {'.'.join(map(str, key))} has shape {value.shape}, "
                              f"config.json implies {var.shape}.")
        var.set_value(jnp.asarray(value, var.get_value().dtype))  # the config's param_dtype
    nnx.update(model, nnx.from_flat_state(flat))
    return model, saved.get("tokenizer", "gpt2")


@flax.struct.dataclass
class _Sampling:
    """The decode loop's carry."""

    tokens: jax.Array  # [B, max_new_tokens] int32, filled left to right (pad_id until drawn)
    logits: jax.Array  # [B, max_new_tokens or 0, embedding_rows]: what each token was drawn from
    state: HopeDecode | None  # the recurrent decode's, after the tokens drawn so far but the last
    key: jax.Array


def generate(model: HOPE, prompt, key, *, max_new_tokens: int, temperature: float = 1.0,
             recompute: bool = False, return_logits: bool = False):
    """Sample `max_new_tokens` after a right-aligned `prompt` [B, P] (no pad inside it).

    One `fori_loop`, jittable. The recurrent decode prefills the prompt once, then costs one
    token's forward per token; `recompute=True` re-runs the whole window per token instead
    (O(T^2)). Their logits agree (to float32 rounding) and they draw with the same key stream.

    Args:
      model: a `HOPE`.
      prompt: [B, P] int32.
      key: PRNG key.
      temperature: the logits are divided by it (near 0: greedy).
      recompute: decode by full-window recompute (the exact reference).
      return_logits: also return the logits each token was drawn from.

    Returns:
      tokens [B, max_new_tokens] int32; with `return_logits`, also the logits
      [B, max_new_tokens, embedding_rows] float32.
    """
    B, P = prompt.shape
    cfg = model.cfg
    graphdef, params = nnx.split(model)

    def draw(c: _Sampling, i, logits) -> _Sampling:  # token i from its logits [B, V]
        key, sub = jax.random.split(c.key)
        token = jax.random.categorical(sub, logits / max(temperature, 1e-6))
        saved = c.logits.at[:, i].set(logits) if return_logits else c.logits
        return c.replace(tokens=c.tokens.at[:, i].set(token), logits=saved, key=key)

    start = _Sampling(tokens=jnp.full((B, max_new_tokens), cfg.pad_id, jnp.int32),
                      logits=jnp.zeros((B, max_new_tokens if return_logits else 0,
                                        cfg.embedding_rows), jnp.float32),
                      state=None, key=key)
    if not max_new_tokens:
        return (start.tokens, start.logits) if return_logits else start.tokens
    if recompute:
        def step(i, c: _Sampling) -> _Sampling:
            window = jnp.concatenate([prompt, c.tokens], axis=1)  # causal: the tail is unseen
            return draw(c, i, nnx.merge(graphdef, params)(window)[:, P + i - 1])
    else:
        logits, state = nnx.merge(graphdef, params).prefill(prompt, max_len=P + max_new_tokens)

        def step(i, c: _Sampling) -> _Sampling:  # feed token i-1, draw token i
            logits, state = nnx.merge(graphdef, params).decode(c.tokens[:, i - 1], c.state)
            return draw(c.replace(state=state), i, logits)

        start = draw(start.replace(state=state), 0, logits[:, -1])  # token 0: the prompt's last
    end = jax.lax.fori_loop(0 if recompute else 1, max_new_tokens, step, start)
    return (end.tokens, end.logits) if return_logits else end.tokens
