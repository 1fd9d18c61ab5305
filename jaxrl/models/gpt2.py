"""GPT-2 as a Flax NNX module, with Hugging Face checkpoint import and export.

The module mirrors the HF parameter names (`wte`, `h[i].attn.c_attn`, ...) so conversion is a
renaming; projection kernels are stored `[out, in]` (see `Dense`), so HF's `[in, out]` Conv1D
weights are transposed on import and export.
The vocabulary has one extra row for the pad token (id 50257): pad keys are masked in every
attention, so padding never leaks into real positions. Parameters carry the logical axis names
of `jaxrl.core.sharding` ("vocab", "embed", "heads", "mlp"); placing them on a mesh is the
caller's job (`nnx.get_partition_spec` + the logical rules).

Decoding uses an explicit, functional `KVCache` (a pytree passed in and returned), so the whole
decode loop can live inside one `jax.lax.while_loop` (see `jaxrl.models.generate`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl.core.config import ConfigError
from jaxrl.models import onednn

GPT2_VOCAB_SIZE = 50257  # HF / OpenAI vocabulary; <|endoftext|> = 50256
PAD_ID = 50257  # our extra row; never produced by the tokenizer's BPE

_PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, n_positions=256),
    "124M": dict(n_layer=12, n_head=12, n_embd=768),
    "350M": dict(n_layer=24, n_head=16, n_embd=1024),
    "774M": dict(n_layer=36, n_head=20, n_embd=1280),
    "1.5B": dict(n_layer=48, n_head=25, n_embd=1600),
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture and numerics. Dtypes are names ("float32" | "bfloat16") so YAML can set them."""

    vocab_size: int = GPT2_VOCAB_SIZE + 1  # + pad row
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0  # HF GPT-2 trains with 0.1; fine-tuning usually uses 0
    layer_norm_epsilon: float = 1e-5
    pad_id: int = PAD_ID
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of matmuls; softmax and LayerNorm stats stay f32
    remat: bool = False  # recompute each block in the backward pass (saves activation memory)
    # Embedding rows are padded up to a multiple of this so the vocab axis shards evenly over
    # `tensor` (50258 -> 50304). Rows past vocab_size are never predicted; HF import and
    # export read and write only the real rows.
    pad_vocab_to: int = 128
    # Who runs the projections' and the tied head's products: "xla" (jnp dots), or "onednn"
    # (dtype bfloat16 only): oneDNN's bf16 x bf16 -> f32 matmul (`jaxrl.models.onednn`), where
    # XLA:CPU's bf16 dot is slow (an AVX-512 BF16 EPYC: the 124M train step 1.8x XLA's f32).
    # One CPU device; the head's inputs round to bf16.
    matmul: str = "xla"

    @classmethod
    def preset(cls, name: str, **overrides) -> GPT2Config:
        if name not in _PRESETS:
            raise ConfigError(f"unknown GPT-2 preset {name!r}; choose one of {sorted(_PRESETS)}.")
        return cls(**{**_PRESETS[name], **overrides})

    def __post_init__(self):
        self.validate()

    def validate(self):
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}.")
        for field in ("param_dtype", "dtype"):
            if getattr(self, field) not in _DTYPES:
                raise ConfigError(f"{field}={getattr(self, field)!r}; choose one of {sorted(_DTYPES)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}.")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ConfigError(f"pad_id={self.pad_id} must index the embedding (vocab_size={self.vocab_size}).")
        if self.pad_vocab_to < 1:
            raise ConfigError(f"pad_vocab_to must be >= 1, got {self.pad_vocab_to}.")
        if self.matmul not in ("xla", "onednn"):
            raise ConfigError(f"matmul={self.matmul!r}; choose 'xla' or 'onednn'.")
        if self.matmul == "onednn":
            if self.dtype != "bfloat16":
                raise ConfigError(f"matmul='onednn' runs bf16 products: set dtype: bfloat16 "
                                  f"(got {self.dtype!r}), or matmul: xla.")
            if (reason := onednn.unavailable()) is not None:
                raise ConfigError(reason)

    @property
    def embedding_rows(self) -> int:
        """vocab_size rounded up to a multiple of pad_vocab_to: the logits' last dimension."""
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer for `max_len` slots, written left to right.

    `valid[b, s]` says slot s of row b holds a real (non-pad) token; `index` is the next free
    slot (the same for all rows: prompts are left-padded, so rows advance together).
    """

    keys: tuple[jax.Array, ...]  # per layer [B, n_head, max_len, head_dim]
    values: tuple[jax.Array, ...]  # same
    valid: jax.Array  # [B, max_len] bool
    index: jax.Array  # [] int32

    @classmethod
    def empty(cls, cfg: GPT2Config, batch_size: int, max_len: int) -> KVCache:
        shape = (batch_size, cfg.n_head, max_len, cfg.head_dim)
        dtype = _DTYPES[cfg.dtype]
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layer)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layer)),
            valid=jnp.zeros((batch_size, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )


def _normal(stddev: float, names: tuple[str | None, ...]):
    # eager_sharding=False: the model builds without a mesh; the caller places it on one.
    return nnx.with_partitioning(nnx.initializers.normal(stddev), names, eager_sharding=False)


def _const(init, names: tuple[str | None, ...]):
    return nnx.with_partitioning(init, names, eager_sharding=False)


class Dense(nnx.Module):
    """`y = x @ kernel.T + bias` with the kernel stored `[out, in]`, torch's layout.

    Why not `nnx.Linear` (`[in, out]`): at decode time a dot has 1-32 rows, and XLA:CPU's
    kernels stream an `[out, in]` weight faster there (8 rows of a 768 x 3072 dot: 482 vs 760 us
    on the Xeon; decode +12-14%, the train step +5-8%: README, "What the numbers say"). HF's
    Conv1D weights are `[in, out]`, so checkpoint import and export transpose them.
    """

    def __init__(self, cfg: GPT2Config, d_in: int, d_out: int, names: tuple[str, str],
                 stddev: float, rngs: nnx.Rngs):
        """`names`: the kernel's logical axes, (out, in)."""
        self.in_features, self.out_features = d_in, d_out  # what `nnx.LoRA` reads
        self.dtype = _DTYPES[cfg.dtype]
        self.onednn = cfg.matmul == "onednn"
        param_dtype = _DTYPES[cfg.param_dtype]
        # Drawn [in, out] and transposed: the same initial model as an `[in, out]` layout.
        def draw(key, shape, dtype):
            return nnx.initializers.normal(stddev)(key, shape[::-1], dtype).T

        self.kernel = nnx.Param(_const(draw, names)(rngs.params(), (d_out, d_in), param_dtype))
        zeros = _const(nnx.initializers.zeros, names[:1])
        self.bias = nnx.Param(zeros(rngs.params(), (d_out,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.onednn:  # f32 out of the product; the bias added before rounding to bf16
            y = onednn.matmul_bf16(x, self.kernel[...]) + self.bias[...].astype(jnp.float32)
            return y.astype(self.dtype)
        kernel, bias = self.kernel[...].astype(self.dtype), self.bias[...].astype(self.dtype)
        return jnp.einsum("...i,oi->...o", x.astype(self.dtype), kernel) + bias


def _layer_norm(cfg: GPT2Config, rngs: nnx.Rngs):
    return nnx.LayerNorm(
        cfg.n_embd,
        epsilon=cfg.layer_norm_epsilon,
        scale_init=_const(nnx.initializers.ones, ("embed",)),
        bias_init=_const(nnx.initializers.zeros, ("embed",)),
        dtype=_DTYPES[cfg.dtype],
        param_dtype=_DTYPES[cfg.param_dtype],
        rngs=rngs,
    )


class Attention(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        self.cfg = cfg
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.c_attn = Dense(cfg, cfg.n_embd, 3 * cfg.n_embd, ("heads", "embed"), 0.02, rngs)
        self.c_proj = Dense(cfg, cfg.n_embd, cfg.n_embd, ("embed", "heads"), residual_std, rngs)
        self.attn_dropout = nnx.Dropout(cfg.dropout)
        self.resid_dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x, attend, *, deterministic, rngs, cached=None):
        """x: [B,T,C]; attend: [B,T,S] bool; cached: (keys, values, index) of this layer.

        Returns the output, and with a cache the layer's updated (keys, values).
        """
        B, T, C = x.shape
        H, D = self.cfg.n_head, self.cfg.head_dim
        # [B, H, T, D]: the cache's layout, so decoding writes and reads it without transposes.
        q, k, v = self.c_attn(x).reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)
        if cached is not None:  # write these T steps at `index`, then attend over all slots
            keys, values, index = cached
            k = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, 0, index, 0))
            v = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), (0, 0, index, 0))
        scores = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(D)
        # finfo.min, not -inf: a row with nothing to attend to (a pad query) stays finite.
        scores = jnp.where(attend[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        probs = self.attn_dropout(probs, deterministic=deterministic, rngs=rngs)
        out = jnp.einsum("bhts,bhsd->bthd", probs, v).reshape(B, T, C)
        out = self.resid_dropout(self.c_proj(out), deterministic=deterministic, rngs=rngs)
        return out if cached is None else (out, (k, v))


class MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.c_fc = Dense(cfg, cfg.n_embd, 4 * cfg.n_embd, ("mlp", "embed"), 0.02, rngs)
        self.c_proj = Dense(cfg, 4 * cfg.n_embd, cfg.n_embd, ("embed", "mlp"), residual_std, rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x, *, deterministic, rngs):
        h = jax.nn.gelu(self.c_fc(x), approximate=True)
        return self.dropout(self.c_proj(h), deterministic=deterministic, rngs=rngs)


class Block(nnx.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.ln_2 = _layer_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, attend, *, deterministic, dropout_key, cached=None):
        # Each dropout layer draws its own key from the stream (one shared key = same masks).
        rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
        h = self.attn(self.ln_1(x), attend, deterministic=deterministic, rngs=rngs, cached=cached)
        if cached is not None:
            h, cached = h
        x = x + h
        x = x + self.mlp(self.ln_2(x), deterministic=deterministic, rngs=rngs)
        return x if cached is None else (x, cached)


class GPT2(nnx.Module):
    """GPT-2 language model with tied input/output embeddings."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        param_dtype, dtype = _DTYPES[cfg.param_dtype], _DTYPES[cfg.dtype]
        self.wte = nnx.Embed(
            cfg.embedding_rows, cfg.n_embd, embedding_init=_normal(0.02, ("vocab", "embed")),
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.wpe = nnx.Embed(
            cfg.n_positions, cfg.n_embd, embedding_init=_normal(0.02, (None, "embed")),
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.drop = nnx.Dropout(cfg.dropout)
        self.h = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
        self.ln_f = _layer_norm(cfg, rngs)

    def __call__(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        rngs: nnx.Rngs | jax.Array | None = None,
    ):
        """Next-token logits.

        Args:
          tokens: [B, T] int32 token ids.
          attention_mask: [B, T], 1 = real token, 0 = padding. Tokens equal to `pad_id` are
            masked whether or not a mask is given.
          deterministic: False enables dropout (then `rngs` is needed when dropout > 0).
          positions: [B, T] position ids. Default: the count of real tokens before each token,
            so left-padded prompts start at position 0 (HF generate does the same).
          cache: a `KVCache` to decode with; these T tokens are written at `cache.index`.
          rngs: dropout randomness, an `nnx.Rngs` or a key.

        Returns:
          logits [B, T, embedding_rows] in float32 (ids >= vocab_size and the pad id are never
          predicted), and the updated cache when one was given.
        """
        x, new_cache = self.hidden(tokens, attention_mask, deterministic=deterministic,
                                   positions=positions, cache=cache, rngs=rngs)
        logits = self.head(x)
        return logits if cache is None else (logits, new_cache)

    def hidden(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """`__call__` without its head: the last block's output [B, T, C] (before `ln_f`) and
        the updated cache (None without one). A model that inserts a layer before the head
        (`fast_weights`' `top`) reuses the trunk, cache included, through this."""
        cfg = self.cfg
        B, T = tokens.shape
        real = tokens != cfg.pad_id
        if attention_mask is not None:
            real &= attention_mask.astype(bool)

        if cache is None:
            key_real, query_slot, key_slot, before = real, jnp.arange(T), jnp.arange(T), 0
        else:
            key_real = jax.lax.dynamic_update_slice(cache.valid, real, (0, cache.index))
            query_slot = cache.index + jnp.arange(T)
            key_slot = jnp.arange(cache.valid.shape[1])
            before = cache.valid.sum(axis=1, keepdims=True, dtype=jnp.int32)
        if positions is None:
            positions = jnp.maximum(before + jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1, 0)
        # [B, T, S]: causal in slot order, and only real keys.
        attend = (key_slot[None, :] <= query_slot[:, None])[None] & key_real[:, None, :]

        if isinstance(rngs, jax.Array):
            rngs = nnx.Rngs(dropout=rngs)
        use_dropout = not deterministic and cfg.dropout > 0
        if use_dropout and rngs is None:
            raise ValueError("dropout is on (deterministic=False) but no `rngs` were given.")

        x = self.wte(tokens) + self.wpe(positions)
        x = self.drop(x, deterministic=deterministic, rngs=rngs)

        new_keys, new_values = [], []
        for layer, block in enumerate(self.h):
            dropout_key = rngs.dropout() if use_dropout else None
            if cache is not None:
                cached = (cache.keys[layer], cache.values[layer], cache.index)
                x, (k, v) = block(x, attend, deterministic=deterministic, dropout_key=dropout_key, cached=cached)
                new_keys.append(k)
                new_values.append(v)
            elif cfg.remat:
                x = nnx.remat(_run_block, static_argnums=(3,))(block, x, attend, deterministic, dropout_key)
            else:
                x = block(x, attend, deterministic=deterministic, dropout_key=dropout_key)
        if cache is None:
            return x, None
        return x, KVCache(tuple(new_keys), tuple(new_values), key_real, cache.index + T)

    def head(self, x: jax.Array) -> jax.Array:
        """`ln_f` then the tied embedding: [..., C] -> [..., embedding_rows] f32 logits."""
        cfg = self.cfg
        x = self.ln_f(x)
        # The tied head's logits are f32 whatever the compute dtype: bf16 logits would round
        # every log-prob an RL loss or ratio reads by up to ~0.03 nats at logits of ~10. With
        # xla the whole product is f32; with onednn its inputs round to bf16 (as autocast's).
        if cfg.matmul == "onednn":
            logits = onednn.matmul_bf16(x, self.wte.embedding[...])
        else:
            embedding = self.wte.embedding[...].astype(jnp.float32)  # [V, C]
            logits = jnp.einsum("...c,vc->...v", x.astype(jnp.float32), embedding)
        # Pad is an input-only token and rows past vocab_size only fill the tensor shards: the
        # model never predicts either (finite, so masked losses stay 0).
        ids = jnp.arange(cfg.embedding_rows)
        return jnp.where((ids == cfg.pad_id) | (ids >= cfg.vocab_size), -1e9, logits)


def _run_block(block, x, attend, deterministic, dropout_key):
    return block(x, attend, deterministic=deterministic, dropout_key=dropout_key)


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints


def _hf_names(cfg: GPT2Config) -> dict[str, tuple]:
    """HF tensor name -> path of the matching parameter in our module (the `_CONV1D` ones are
    stored transposed)."""
    names = {"wte.weight": ("wte", "embedding"), "wpe.weight": ("wpe", "embedding")}
    for i in range(cfg.n_layer):
        for hf, ours in [
            ("ln_1.weight", ("ln_1", "scale")), ("ln_1.bias", ("ln_1", "bias")),
            ("attn.c_attn.weight", ("attn", "c_attn", "kernel")), ("attn.c_attn.bias", ("attn", "c_attn", "bias")),
            ("attn.c_proj.weight", ("attn", "c_proj", "kernel")), ("attn.c_proj.bias", ("attn", "c_proj", "bias")),
            ("ln_2.weight", ("ln_2", "scale")), ("ln_2.bias", ("ln_2", "bias")),
            ("mlp.c_fc.weight", ("mlp", "c_fc", "kernel")), ("mlp.c_fc.bias", ("mlp", "c_fc", "bias")),
            ("mlp.c_proj.weight", ("mlp", "c_proj", "kernel")), ("mlp.c_proj.bias", ("mlp", "c_proj", "bias")),
        ]:  # fmt: skip
            names[f"h.{i}.{hf}"] = ("h", i, *ours)
    names["ln_f.weight"] = ("ln_f", "scale")
    names["ln_f.bias"] = ("ln_f", "bias")
    return names


_CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # HF [in, out]; ours [out, in]


def _hf_layout(hf_name: str, value: np.ndarray) -> np.ndarray:
    """HF's tensor from ours or ours from HF's: Conv1D weights transpose, the rest are shared."""
    return value.T if hf_name.endswith(_CONV1D) else value


def _read_hf_tensors(path: Path) -> dict[str, np.ndarray]:
    if (path / "model.safetensors").exists():
        from safetensors.numpy import load_file

        tensors = load_file(path / "model.safetensors")
    elif (path / "pytorch_model.bin").exists():
        import torch  # only needed for the legacy format

        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        tensors = {k: v.float().numpy() for k, v in state.items()}
    else:
        raise FileNotFoundError(
            f"{path} has neither model.safetensors nor pytorch_model.bin; "
            "save the HF model with `model.save_pretrained(path)` first."
        )
    # GPT2LMHeadModel prefixes "transformer."; GPT2Model does not. lm_head is tied to wte.
    return {k.removeprefix("transformer."): v for k, v in tensors.items() if not k.startswith("lm_head")}


def from_pretrained(path: str | Path, **overrides) -> GPT2:
    """Load a HF GPT-2 directory (config.json + model.safetensors or pytorch_model.bin).

    `overrides` go to `GPT2Config` (e.g. dtype="bfloat16", dropout=0.1). The embedding gains
    one row for the pad token (id = HF vocab size, 50257 for GPT-2), set to the mean embedding;
    it is never attended to, so its value only matters if a pad token's own logits are read.
    Rows past it up to `embedding_rows` (shard padding) are zero and never predicted.
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path / 'config.json'} not found: is {path} a HF GPT-2 directory?")
    hf = json.loads((path / "config.json").read_text())
    hf_vocab = hf["vocab_size"]
    cfg = GPT2Config(
        **{
            "vocab_size": hf_vocab + 1,
            "pad_id": hf_vocab,
            "n_positions": hf["n_positions"],
            "n_embd": hf["n_embd"],
            "n_layer": hf["n_layer"],
            "n_head": hf["n_head"],
            "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-5),
            **overrides,
        }
    )
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{path}: activation {hf['activation_function']!r} is not GPT-2's tanh GELU.")
    tensors = _read_hf_tensors(path)
    model = nnx.eval_shape(lambda: GPT2(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    names = _hf_names(cfg)
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing[:5]}{'...' if len(missing) > 5 else ''}.")
    param_dtype = _DTYPES[cfg.param_dtype]
    for hf_name, ours in names.items():
        value = _hf_layout(hf_name, tensors[hf_name])
        if hf_name == "wte.weight" and value.shape[0] < cfg.embedding_rows:
            pad = np.broadcast_to(value.mean(0), (cfg.vocab_size - value.shape[0], value.shape[1]))
            fill = np.zeros((cfg.embedding_rows - cfg.vocab_size, value.shape[1]), value.dtype)
            value = np.concatenate([value, pad, fill])
        variable = state
        for key in ours:
            variable = variable[key]
        if variable.shape != value.shape:
            raise ValueError(f"{path}: {hf_name} has shape {value.shape}, expected {variable.shape}.")
        variable.set_value(jnp.asarray(value, param_dtype))
    nnx.update(model, state)
    return model


def save_pretrained(model: GPT2, path: str | Path) -> None:
    """Write `model` as a HF GPT-2 directory (model.safetensors + config.json).

    The pad row and the shard-padding rows are ours alone, so they are trimmed (50304 -> HF's
    50257 rows);
    `transformers.GPT2LMHeadModel.from_pretrained(path)` loads the result.
    """
    from safetensors.numpy import save_file

    cfg = model.cfg
    vocab_size = cfg.pad_id if cfg.pad_id == cfg.vocab_size - 1 else cfg.vocab_size
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = nnx.state(model)
    tensors = {}
    for hf_name, ours in _hf_names(cfg).items():
        variable = state
        for key in ours:
            variable = variable[key]
        value = np.asarray(jax.device_get(variable.get_value()), np.float32)
        if hf_name == "wte.weight":
            value = value[:vocab_size]
        tensors[f"transformer.{hf_name}"] = np.ascontiguousarray(_hf_layout(hf_name, value))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": vocab_size,
        "n_positions": cfg.n_positions,
        "n_ctx": cfg.n_positions,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
