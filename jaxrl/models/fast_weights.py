"""Fast weights on a frozen GPT-2: the parameters test-time training adapts, reset per document.

Two variants behind one interface (`FastLM`), chosen by `FastConfig.type`:

- `top`: a residual MLP over the frozen trunk's last hidden states,
  `logits = ln_f(h + FastTop(LN(h))) . W_E^T`, with `h = sg(trunk(x))`. Its output layer
  starts at 0, so the start equals the base model. The trunk's states for a chunk are computed
  once (when the chunk is scored) and cached, so an inner step costs the fast layer and the
  tied head only.
- `lora`: `nnx.LoRA` (rank r, scale alpha / r, B = 0 so the start equals the base model) on
  `c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj` of every block; an inner step runs the
  whole model forward and backward.

Either way one chunk's model input (`inputs`) is what scoring it needs: trunk states `[C, d]`
(top) or the `2C` tokens `[X_{t-1}; X_t]` (lora); targets `[C]` are the chunk's tokens. The
base parameters enter every loss under `jax.lax.stop_gradient` and are never differentiated;
the fast weights and the inner optimiser's state are float32. Either merged model decodes
like a GPT-2, so `generate(lm.graphdef, lm.params(fast), ...)` samples from the adapted model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxrl.core.config import ConfigError
from jaxrl.models import gpt2


@dataclasses.dataclass
class FastConfig:
    """Which fast weights, and the inner optimiser that adapts them (reset per document)."""

    type: Literal["top", "lora"] = "top"
    hidden: int = 256  # top: the fast MLP's width
    rank: int = 8  # lora
    alpha: float = 16.0  # lora: output scale alpha / rank
    inner_opt: Literal["adam", "sgd"] = "adam"
    inner_lr: float = 3e-3

    def validate(self):
        if self.hidden < 1 or self.rank < 1:
            raise ConfigError(f"fast.hidden and fast.rank must be >= 1, got {self.hidden}, {self.rank}.")
        if self.inner_lr <= 0:
            raise ConfigError(f"fast.inner_lr must be > 0, got {self.inner_lr}.")


class FastTop(nnx.Module):
    """h + W2 gelu(W1 LN(h)); W2 = 0 at the start, so the start is the base model."""

    def __init__(self, d: int, hidden: int, *, rngs: nnx.Rngs):
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = nnx.Linear(d, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, d, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        return h + self.fc2(jax.nn.gelu(self.fc1(self.ln(h.astype(jnp.float32)))))


class ScaledLoRA(nnx.LoRA):
    """`nnx.LoRA` around a frozen Linear with the usual alpha / rank output scale."""

    def __init__(self, base: nnx.Linear, rank: int, scale: float, *, rngs: nnx.Rngs):
        super().__init__(base.in_features, rank, base.out_features, base_module=base, rngs=rngs)
        self.scale = scale

    def __call__(self, x: jax.Array) -> jax.Array:
        lora = x.astype(jnp.float32) @ self.lora_a[...] @ self.lora_b[...]
        return self.base_module(x) + (self.scale * lora).astype(x.dtype)


def add_lora(model: gpt2.GPT2, rank: int, alpha: float, rngs: nnx.Rngs) -> gpt2.GPT2:
    """Wrap the four projections of every block in `ScaledLoRA` (in place; returns model)."""
    for block in model.h:
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"),
                             (block.mlp, "c_fc"), (block.mlp, "c_proj")):
            setattr(parent, name, ScaledLoRA(getattr(parent, name), rank, alpha / rank, rngs=rngs))
    return model


def chunk_ce(logits: jax.Array, targets: jax.Array, mask: jax.Array):
    """Mean CE over masked targets and the free per-token signals: entropy, -log max p and
    ||softmax - onehot|| (the norm of dCE/dlogits). logits [C, V], targets/mask [C]."""
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.take_along_axis(logp, targets[:, None], -1)[:, 0]
    p = jnp.exp(logp)
    entropy = -jnp.sum(p * logp, -1)
    neg_log_max = -jnp.max(logp, -1)
    onehot = jax.nn.one_hot(targets, logits.shape[-1])
    grad_norm = jnp.sqrt(jnp.sum(jnp.square(p - onehot), -1))
    n = jnp.maximum(mask.sum(), 1.0)
    mean = lambda x: jnp.sum(x * mask) / n  # noqa: E731
    return mean(ce), {"entropy": mean(entropy), "neg_log_max": mean(neg_log_max),
                      "grad_proxy": mean(grad_norm)}


@dataclasses.dataclass(frozen=True, eq=False)
class FastLM:
    """A frozen GPT-2 plus fast weights, as pure functions of (fast, one chunk).

    `fast0` is the start (a float32 pytree); `base` the frozen weights. `score` and
    `inner_step` see one chunk, unbatched; vmap them over documents.
    """

    cfg: FastConfig
    graphdef: Any  # of the whole model (base + fast)
    base: Any
    fast0: Any
    tx: optax.GradientTransformation
    chunk: int

    def logits(self, fast, inputs: jax.Array) -> jax.Array:
        """One chunk's next-token logits [C, V]: trunk states [C, d] (top) or tokens [2C] (lora)."""
        base = jax.lax.stop_gradient(self.base)
        model = nnx.merge(self.graphdef, fast, base, copy=True)
        if self.cfg.type == "top":
            return model.lm.head(model.fast(inputs))
        return model(inputs[None])[0, self.chunk - 1:-1]

    def params(self, fast) -> nnx.State:
        """Base + `fast` as one state: `generate(lm.graphdef, lm.params(fast), ...)` samples
        from the adapted model (both variants decode like a GPT-2, KV cache included)."""
        return nnx.merge_state(fast, self.base)

    def score(self, fast, inputs, targets, mask):
        """-> (mean CE of the chunk's targets, aux signals)."""
        return chunk_ce(self.logits(fast, inputs), targets, mask)

    def loss(self, fast, inputs, targets, mask):
        return self.score(fast, inputs, targets, mask)[0]

    def inner_step(self, fast, opt, inputs, targets, mask):
        """One step on the chunk's LM loss -> (fast, opt, ||g||)."""
        g = jax.grad(self.loss)(fast, inputs, targets, mask)
        updates, opt = self.tx.update(g, opt, fast)
        return optax.apply_updates(fast, updates), opt, optax.global_norm(g)


class _TopModel(nnx.Module):
    """The frozen GPT-2 with `FastTop` between its trunk and its head, called like a GPT-2
    (`(tokens, mask, cache=...)`), so `generate` decodes it as it decodes the base model."""

    def __init__(self, lm: gpt2.GPT2, fast: FastTop):
        self.lm = lm
        self.fast = fast

    @property
    def cfg(self) -> gpt2.GPT2Config:
        return self.lm.cfg

    def __call__(self, tokens, attention_mask=None, *, cache=None, **kw):
        h, cache_out = self.lm.hidden(tokens, attention_mask, cache=cache, **kw)
        logits = self.lm.head(self.fast(h))
        return logits if cache is None else (logits, cache_out)


def build(lm: gpt2.GPT2, cfg: FastConfig, chunk: int, seed: int = 0) -> FastLM:
    """Attach fast weights to `lm` (consumed) and split them from the frozen base."""
    rngs = nnx.Rngs(seed)
    if cfg.type == "top":
        model = _TopModel(lm, FastTop(lm.cfg.n_embd, cfg.hidden, rngs=rngs))
        graphdef, fast, base = nnx.split(model, nnx.PathContains("fast"), ...)
    else:
        model = add_lora(lm, cfg.rank, cfg.alpha, rngs)
        graphdef, fast, base = nnx.split(model, nnx.LoRAParam, ...)
    fast = jax.tree.map(lambda x: x.astype(jnp.float32), fast)
    tx = (optax.adam(cfg.inner_lr, b1=0.9, b2=0.999) if cfg.inner_opt == "adam"
          else optax.sgd(cfg.inner_lr))
    return FastLM(cfg=cfg, graphdef=graphdef, base=base, fast0=fast, tx=tx, chunk=chunk)


def trunk_states(lm: gpt2.GPT2, tokens: jax.Array, chunk: int) -> jax.Array:
    """Cached inputs of the `top` variant: windows [N, 2C] -> states of the last C targets'
    predecessors [N, C, d] (position C-1 .. 2C-2 predict tokens C .. 2C-1)."""
    return jax.lax.stop_gradient(lm.hidden(tokens)[0][:, chunk - 1:-1])
