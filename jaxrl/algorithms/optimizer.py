"""AdamW with linear warmup, cosine decay, global-norm clipping and a matrices-only decay mask."""

from __future__ import annotations

import dataclasses

import jax
import optax

from jaxrl.core.config import ConfigError


@dataclasses.dataclass
class OptimizerConfig:
    lr: float = 3e-4  # peak learning rate, reached after warmup
    warmup_steps: int = 100
    decay_steps: int = 10_000  # total schedule length including warmup; lr = lr*min_lr_ratio after
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # embeddings are 2-D but usually excluded from decay
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # 0 disables clipping

    def validate(self):
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr must be > 0, got {self.lr}.")
        if self.warmup_steps < 0 or self.decay_steps <= self.warmup_steps:
            raise ConfigError(
                f"optimizer: need 0 <= warmup_steps < decay_steps, got {self.warmup_steps}, {self.decay_steps}."
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        if self.weight_decay < 0 or self.clip_norm < 0:
            raise ConfigError("optimizer.weight_decay and optimizer.clip_norm must be >= 0.")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ConfigError(f"optimizer.b1/b2 must be in [0, 1), got {self.b1}, {self.b2}.")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """0 -> lr linearly over warmup_steps, then cosine to lr * min_lr_ratio at decay_steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.decay_steps,
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def weight_decay_mask(params, *, decay_embeddings: bool = False):
    """True for matrices (ndim >= 2); False for biases, LayerNorm and (by default) embeddings.

    Embeddings are recognised by their parameter name, `embedding` (as in `nnx.Embed`).
    """

    def decays(path, leaf) -> bool:
        names = [getattr(key, "key", getattr(key, "name", None)) for key in path]
        is_embedding = "embedding" in names
        return leaf.ndim >= 2 and (decay_embeddings or not is_embedding)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    cfg.validate()
    adamw = optax.adamw(
        learning_rate_schedule(cfg),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=lambda params: weight_decay_mask(params, decay_embeddings=cfg.decay_embeddings),
    )
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw
