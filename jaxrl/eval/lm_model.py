"""The model interface every LM evaluation takes, and its adapter for Flax NNX language models.

Evaluations (`zeroshot`, `perplexity`, `niah`, `continual`) see a model only through
`LanguageModel`, so GPT-2, HOPE or anything else plugs in by providing three things:

    max_length   longest input the model takes (its context); a scored row may be one token
                 longer, because the last token is only ever a target
    pad_id       the id rows are padded with (mask 0 there)
    logprobs(tokens [B, T] int32, mask [B, T] int32) -> TokenScores
                 column t: log p(tokens[:, t] | tokens[:, :t]) and whether tokens[:, t] was
                 the argmax; column 0 has no prefix and is 0 / False

Optional: `memorize(tokens, mask) -> LanguageModel`, a test-time update (a model with fast
weights writes the tokens into its memory) that returns the updated model and leaves the
original as it was. `continual` reports a second curve with it when the model has it.
`FastStateLM` provides it for models that carry a fast state across calls (HOPE:
`module.init_fast(B)` and `module(tokens, mask, fast=state) -> (logits, state')`).
`load(path)` picks the adapter by the export's config.json: a HOPE export
(`hope.save_pretrained`) -> `FastStateLM`, a Hugging Face GPT-2 -> `NNXLM`.

`NNXLM` wraps any NNX module called as `module(tokens, attention_mask) -> logits [B, T, V]`
(GPT-2 here; HOPE has the same signature): it is split once, placed on the mesh by its
logical axis names and compiled with `core.step.compile_eval`, once per padded shape.
`score_sequences` is the one batching path: rows sorted by length, padded on the right to a
power-of-two bucket and to a fixed batch size, so a whole evaluation compiles a handful of
shapes.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl.core.config import MeshConfig
from jaxrl.core.mesh import check_batch_size, make_mesh, replicated, shard_batch, shard_state, state_shardings
from jaxrl.core.step import compile_eval

MIN_BUCKET = 16  # shortest padded input length


@dataclasses.dataclass(frozen=True)
class TokenScores:
    logprobs: np.ndarray  # [B, T] float32; column 0 is 0
    greedy: np.ndarray  # [B, T] bool; column 0 is False


@runtime_checkable
class LanguageModel(Protocol):
    max_length: int
    pad_id: int

    def logprobs(self, tokens: np.ndarray, mask: np.ndarray) -> TokenScores: ...


def can_memorize(lm: LanguageModel) -> bool:
    return callable(getattr(lm, "memorize", None))


def _scores(graphdef, params, batch, fast=None):
    """Log-prob and argmax hit of each next token; the model sees all but the last column."""
    model = nnx.merge(graphdef, params, copy=True)
    if fast is None:
        logits = model(batch["tokens"][:, :-1], batch["mask"][:, :-1])  # [B, T-1, V]
    else:
        logits, _ = model(batch["tokens"][:, :-1], batch["mask"][:, :-1], fast=fast)
    targets = batch["tokens"][:, 1:]  # [B, T-1]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logp = picked - jax.nn.logsumexp(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1) == targets
    first = jnp.zeros_like(logp[:, :1])
    return jnp.concatenate([first, logp], axis=1), jnp.concatenate([first.astype(bool), greedy], axis=1)


class NNXLM:
    """`LanguageModel` over an NNX module `(tokens, attention_mask) -> logits`."""

    def __init__(self, module: nnx.Module, *, mesh=None, max_length: int = 0, pad_id: int | None = None):
        cfg = getattr(module, "cfg", None)
        self.max_length = max_length or cfg.n_positions
        self.pad_id = cfg.pad_id if pad_id is None else pad_id
        self.mesh = mesh if mesh is not None else make_mesh(MeshConfig(), jax.devices()[:1])
        self.graphdef, params = nnx.split(module)
        self.shardings = state_shardings(params, self.mesh)
        self.params = shard_state(params, self.mesh)
        graphdef = self.graphdef
        self._score = compile_eval(lambda p, batch: _scores(graphdef, p, batch), self.mesh, self.shardings)

    @classmethod
    def from_pretrained(cls, path, *, mesh=None) -> NNXLM:
        """A Hugging Face-layout GPT-2 directory (an SFT run's `hf/`)."""
        from jaxrl.models import gpt2

        return cls(gpt2.from_pretrained(path), mesh=mesh)

    def with_params(self, params) -> NNXLM:
        """The same model and compiled function with other weights (continual training)."""
        other = copy.copy(self)
        other.params = params
        return other

    def module(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params, copy=True)

    def logprobs(self, tokens: np.ndarray, mask: np.ndarray) -> TokenScores:
        check_batch_size(len(tokens), self.mesh, "batch rows")
        batch = shard_batch({"tokens": np.asarray(tokens, np.int32), "mask": np.asarray(mask, np.int32)},
                            self.mesh)
        logp, greedy = jax.device_get(self._score(self.params, batch))
        return TokenScores(np.asarray(logp), np.asarray(greedy))


def bucket(length: int, max_length: int) -> int:
    """Padded input length for a row of `length` tokens (input = row minus its last token)."""
    size = MIN_BUCKET
    while size < length - 1:
        size *= 2
    return min(size, max_length) + 1


def score_sequences(lm: LanguageModel, rows: Sequence[Sequence[int]], batch_size: int) -> list[TokenScores]:
    """Score each row (at most `lm.max_length + 1` tokens) in fixed-shape batches.

    Returns one `TokenScores` per row, unpadded: column t scores row[t] given row[:t].
    """
    too_long = [i for i, r in enumerate(rows) if len(r) > lm.max_length + 1]
    if too_long:
        raise ValueError(f"{len(too_long)} rows exceed max_length + 1 = {lm.max_length + 1} tokens "
                         f"(row {too_long[0]} has {len(rows[too_long[0]])}); truncate them first.")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[TokenScores | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = bucket(max(len(rows[i]) for i in chunk), lm.max_length)
        tokens = np.full((batch_size, width), lm.pad_id, np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        for r, i in enumerate(chunk):
            tokens[r, : len(rows[i])] = rows[i]
            mask[r, : len(rows[i])] = 1
        scores = lm.logprobs(tokens, mask)
        for r, i in enumerate(chunk):
            n = len(rows[i])
            out[i] = TokenScores(scores.logprobs[r, :n], scores.greedy[r, :n])
    return out


def _memorize(graphdef, params, fast, batch):
    """The fast state after reading the batch, from `fast` or (None) the initial memory."""
    model = nnx.merge(graphdef, params, copy=True)
    fast = model.init_fast(batch["tokens"].shape[0]) if fast is None else fast
    return model(batch["tokens"], batch["mask"], fast=fast)[1]


class FastStateLM(NNXLM):
    """`NNXLM` plus `memorize` for a model whose fast-weight memory is carried across calls.

    Until it memorises, it is scored from the meta-learned initial memory, which is what a
    plain call does, so any batch size goes. `memorize(tokens)` gives batch row r the memory
    of row r; the copy it returns then scores batches of that many rows, row r with what row
    r has memorised. New weights (`with_params`) start from their own initial memory.
    """

    def __init__(self, module: nnx.Module, **kw):
        super().__init__(module, **kw)
        self.fast = None
        graphdef, shardings = self.graphdef, (self.shardings, replicated(self.mesh))
        self._score_fast = compile_eval(lambda s, b: _scores(graphdef, s[0], b, fast=s[1]), self.mesh,
                                        shardings)
        self._write = compile_eval(lambda s, b: _memorize(graphdef, *s, b), self.mesh, shardings)
        self._first_write = compile_eval(lambda p, b: _memorize(graphdef, p, None, b), self.mesh,
                                         self.shardings)

    @classmethod
    def from_pretrained(cls, path, *, mesh=None) -> FastStateLM:
        """A `hope.save_pretrained` directory (an sft_hope run's `hope/`)."""
        from jaxrl.models import hope

        return cls(hope.from_pretrained(path)[0], mesh=mesh)

    def with_params(self, params) -> FastStateLM:
        other = super().with_params(params)
        other.fast = None
        return other

    def logprobs(self, tokens: np.ndarray, mask: np.ndarray) -> TokenScores:
        if self.fast is None:
            return super().logprobs(tokens, mask)
        rows = jax.tree.leaves(self.fast)[0].shape[0]
        if len(tokens) != rows:
            raise ValueError(f"this model memorised {rows} rows; score batches of {rows} rows "
                             f"(got {len(tokens)}), or score the model before it memorised.")
        batch = shard_batch({"tokens": np.asarray(tokens, np.int32), "mask": np.asarray(mask, np.int32)},
                            self.mesh)
        logp, greedy = jax.device_get(self._score_fast((self.params, self.fast), batch))
        return TokenScores(np.asarray(logp), np.asarray(greedy))

    def memorize(self, tokens: np.ndarray, mask: np.ndarray) -> FastStateLM:
        """A copy whose memory has also read `tokens` (row by row); this model is unchanged."""
        check_batch_size(len(tokens), self.mesh, "batch rows")
        batch = shard_batch({"tokens": np.asarray(tokens, np.int32), "mask": np.asarray(mask, np.int32)},
                            self.mesh)
        other = copy.copy(self)
        if self.fast is None:
            other.fast = self._first_write(self.params, batch)
        else:
            other.fast = self._write((self.params, self.fast), batch)
        return other


def load(path, *, mesh=None) -> NNXLM:
    """The `LanguageModel` of an export directory: HOPE (`hope/`) or Hugging Face GPT-2 (`hf/`)."""
    from jaxrl.models import hope

    if hope.is_pretrained(path):
        return FastStateLM.from_pretrained(path, mesh=mesh)
    return NNXLM.from_pretrained(path, mesh=mesh)
