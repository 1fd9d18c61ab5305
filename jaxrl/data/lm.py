"""Language-model data: documents (or token shards) -> fixed windows -> Grain batches.

Batches are host-local NumPy dicts (this process's rows of the global batch):

    tokens          int32[B, T]    model input (window[:-1])
    targets         int32[B, T]    next tokens (window[1:])
    loss_mask       float32[B, T]  1 where the target is a real token (pad targets are 0)
    attention_mask  int32[B, T]    1 where the input token is real, 0 on pad

Each document ends with `<|endoftext|>`. With `packing` (default) all documents form one
token stream cut into windows of `seq_len + 1` tokens that overlap by one token, so every
token is a target exactly once and documents may span windows; only the last window is
padded. Without packing each document is cut the same way on its own and right-padded.
Pad (`Tokenizer.pad_id`) never appears as a target that counts, nor as an attended input.

Two sources of windows, one pipeline. A text path (file, directory, glob, TFDS name) is
tokenized once at start into a flat uint16 array and windows are views into it (~2 bytes
per token of RAM on every host: fine up to a few hundred MB of text). A shard directory
(`python -m jaxrl.data process`, detected by its `index.json`, given as `path` or
`val_path`) is read through `shards.ShardWindowSource`: the same windows, read from
ArrayRecord records on demand, so memory does not grow with the corpus; its `train` split
trains and its `val` split validates. Either way the Grain pipeline is a `MapDataset` over
window indices (shuffle, repeat, per-host slice, batch), so state restore is exact and cheap
(the iterator state is a step count).

Multi-host: the shuffled global order is dealt round-robin over processes, so the union of
the hosts' batches at a step is the same global batch for any process count.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterator, Sequence
from typing import Literal

import grain
import numpy as np
from etils import epath

from jaxrl.core.config import ConfigError
from jaxrl.data import shards, sources
from jaxrl.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class LMDataConfig:
    """Where the text is, how it is cut into windows, and how batches are drawn."""

    path: str = "corpora/tinyshakespeare/input.txt"  # file, directory, glob, shard dir; TFDS: dataset name
    val_path: str = ""  # separate validation data; empty: hold out `val_fraction` of `path`
    data_dir: str = ""  # root for relative paths (TFDS: its data_dir); empty: $JAXRL_DATA_DIR or ../shared/data
    format: Literal["auto", "text", "jsonl", "tfds"] = "auto"  # auto: by file suffix
    text_field: str = "text"  # JSONL / TFDS field holding the document text
    separator: str = ""  # text files: "" = one document per file, "\n\n" = blank-line separated
    tfds_split: str = "train"
    tfds_val_split: str = ""  # TFDS validation split; empty: hold out `val_fraction`
    seq_len: int = 256
    batch_size: int = 8  # global, over all processes
    packing: bool = True
    shuffle: bool = True
    seed: int = 0
    val_fraction: float = 0.1

    def validate(self):
        if self.seq_len < 1:
            raise ConfigError(f"data.seq_len must be >= 1, got {self.seq_len}.")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}.")
        if not self.path:
            raise ConfigError("data.path is empty; set it to a text/JSONL file, directory or glob.")
        needs_fraction = not (self.val_path or (self.format == "tfds" and self.tfds_val_split))
        if needs_fraction and not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1) when no data.val_path is "
                              f"given, got {self.val_fraction}.")
        if self.format != "tfds":
            for key in ("path", "val_path"):
                value = getattr(self, key)
                if not value:
                    continue
                location = _locate(value, self.data_dir)
                try:
                    if shards.is_shard_dir(location):
                        shards.read_index(location)
                        if not self.packing:
                            raise ConfigError(f"data.{key}={value!r} is a shard directory, whose documents "
                                              "are packed when written; set data.packing=true.")
                    else:
                        sources.list_files(location, self.format)
                except (FileNotFoundError, sources.DataError) as e:
                    raise ConfigError(f"data.{key}: {e}") from None


class WindowSource:
    """Random access to fixed windows of a token array; Grain's `MapDataset.source` reads it.

    Window i is `tokens[starts[i] : min(starts[i] + T + 1, ends[i])]`, right-padded to T + 1.
    """

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray, seq_len: int, pad_id: int):
        self.tokens, self.starts, self.ends = tokens, starts, ends
        self.seq_len, self.pad_id = seq_len, pad_id

    @classmethod
    def from_documents(cls, token_docs: Sequence[np.ndarray], *, seq_len: int, pad_id: int, packing: bool):
        """Windows over documents (each already ending in EOT), packed or one document at a time."""
        lengths = np.array([len(d) for d in token_docs], dtype=np.int64)
        dtype = np.uint16 if pad_id < 2**16 else np.int32
        tokens = np.concatenate(token_docs).astype(dtype) if len(token_docs) else np.zeros(0, dtype)
        if packing:
            spans = [(0, len(tokens))]
        else:
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            spans = list(zip(offsets[:-1], offsets[1:]))
        # A span of n tokens has n - 1 targets, so ceil((n - 1) / T) windows starting every T.
        starts = [np.arange(lo, hi - 1, seq_len, dtype=np.int64) for lo, hi in spans]
        ends = [np.full(len(s), hi, dtype=np.int64) for s, (_, hi) in zip(starts, spans)]
        starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        return cls(tokens, starts, ends, seq_len, pad_id)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> np.ndarray:
        start = int(self.starts[index])
        piece = self.tokens[start : min(start + self.seq_len + 1, int(self.ends[index]))]
        window = np.full(self.seq_len + 1, self.pad_id, dtype=np.int32)
        window[: len(piece)] = piece
        return window

    @property
    def num_target_tokens(self) -> int:
        """Real (loss-counted) targets over one pass."""
        return int(np.sum(np.minimum(self.starts + self.seq_len + 1, self.ends) - self.starts - 1))


def batch_from_windows(windows: np.ndarray | Sequence[np.ndarray], pad_id: int) -> Batch:
    """[B, T+1] token windows -> the batch dict documented at the top of this module."""
    windows = np.asarray(np.stack(windows) if not isinstance(windows, np.ndarray) else windows, np.int32)
    tokens, targets = windows[:, :-1], windows[:, 1:]
    return {
        "tokens": np.ascontiguousarray(tokens),
        "targets": np.ascontiguousarray(targets),
        "loss_mask": (targets != pad_id).astype(np.float32),
        "attention_mask": (tokens != pad_id).astype(np.int32),
    }


# GPT-2's pre-tokeniser always ends a piece after a newline that follows a non-space and
# precedes a non-space or one space and a non-space ("x\n Y" -> "x", "\n", " Y", and "x\n"
# alone -> "x", "\n"); BPE never merges across pieces, so cutting there keeps the ids.
_SAFE_CUT = re.compile(r"(?<=\S)\n(?= ?\S)")


def _chunks(text: str, chunk_chars: int) -> list[str]:
    """`text` cut at safe points roughly every `chunk_chars` characters."""
    pieces, start = [], 0
    while len(text) - start > chunk_chars:
        cut = _SAFE_CUT.search(text, start + chunk_chars)
        if cut is None:
            break
        pieces.append(text[start : cut.end()])
        start = cut.end()
    pieces.append(text[start:])
    return pieces


def tokenize_documents(docs: Sequence[str], tokenizer: Tokenizer, *, chunk_chars: int = 1 << 20) -> list[np.ndarray]:
    """Token ids of each document with `<|endoftext|>` appended.

    Long documents (one-file corpora) are cut into ~`chunk_chars` pieces so tiktoken encodes
    them on all cores; the ids are identical to encoding each document whole.
    """
    chunked = [_chunks(doc, chunk_chars) for doc in docs]
    ids = iter(tokenizer.encode_batch([piece for pieces in chunked for piece in pieces]))
    eot = np.array([tokenizer.eot_id], dtype=np.int32)
    return [np.concatenate([*(np.array(next(ids), np.int32) for _ in pieces), eot]) for pieces in chunked]


def train_dataset(
    source: WindowSource,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Infinite stream of host-local batches: shuffle (reseeded each epoch) -> repeat -> shard -> batch.

    `batch_size` is global; each of `process_count` hosts gets `batch_size // process_count` rows:
    host p takes the p-th contiguous block of every global batch. The hosts' blocks are laid on
    the mesh in process order, so the global batch (rows and their order, hence each row's
    dropout mask) is the same on any number of processes.
    """
    if len(source) == 0:
        raise sources.DataError("no training windows: the corpus has fewer than 2 tokens.")
    local_batch = _local_batch_size(batch_size, process_count)
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed)
    ds = ds.repeat()
    ds = grain.MapDataset.range(len(ds) // process_count).map(functools.partial(
        _block_row, ds, local_batch=local_batch, batch_size=batch_size, process_index=process_index))
    ds = ds.batch(local_batch, drop_remainder=True,
                  batch_fn=functools.partial(batch_from_windows, pad_id=source.pad_id))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))


def _block_row(ds, i: int, *, local_batch: int, batch_size: int, process_index: int):
    """Row i of this host's stream: row i % local_batch of its block of global batch i // local_batch."""
    return ds[(i // local_batch) * batch_size + process_index * local_batch + i % local_batch]


def eval_batches(
    source: WindowSource,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_batches: int = 0,
) -> Iterator[Batch]:
    """One ordered pass over every window, in fixed-shape batches.

    The last global batch is filled with all-pad rows (loss_mask 0), so every host yields the
    same number of batches, shapes never change (no recompiles) and mean losses stay exact
    when weighted by `loss_mask`. `max_batches > 0` stops early.
    """
    local_batch = _local_batch_size(batch_size, process_count)
    num_batches = -(-len(source) // batch_size)
    if max_batches > 0:
        num_batches = min(num_batches, max_batches)
    blank = np.full(source.seq_len + 1, source.pad_id, dtype=np.int32)
    for b in range(num_batches):
        start = b * batch_size + process_index * local_batch  # this host's block, as in training
        rows = range(start, start + local_batch)
        yield batch_from_windows([source[i] if i < len(source) else blank for i in rows], source.pad_id)


@dataclasses.dataclass
class LMData:
    """Train/validation windows (in memory or from shards) plus the iterators a recipe needs."""

    config: LMDataConfig
    train: WindowSource | shards.ShardWindowSource
    val: WindowSource | shards.ShardWindowSource
    process_index: int = 0
    process_count: int = 1
    tokenizer: Tokenizer | None = None  # the one whose ids the windows hold

    def train_iterator(self) -> grain.DatasetIterator:
        """Fresh iterator from the start; checkpoint it with `get_state()` / `set_state()`."""
        cfg = self.config
        ds = train_dataset(self.train, batch_size=cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle,
                           process_index=self.process_index, process_count=self.process_count)
        return iter(ds)

    def val_batches(self, max_batches: int = 0) -> Iterator[Batch]:
        return eval_batches(self.val, batch_size=self.config.batch_size, process_index=self.process_index,
                            process_count=self.process_count, max_batches=max_batches)


def load_lm_data(
    cfg: LMDataConfig,
    tokenizer: Tokenizer | None = None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> LMData:
    """Read, split, tokenize and window the corpus in `cfg` (process defaults: from JAX).

    `tokenizer` defaults to the shard directory's own (if `path` is one), else GPT-2's; a
    shard directory written with another tokenizer than the one given is an error.
    """
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    _local_batch_size(cfg.batch_size, process_count)

    def location(path: str):
        return path if cfg.format == "tfds" else _locate(path, cfg.data_dir)

    shard_dirs = {key: location(getattr(cfg, key)) for key in ("path", "val_path")
                  if getattr(cfg, key) and cfg.format != "tfds" and shards.is_shard_dir(location(getattr(cfg, key)))}
    if tokenizer is None:
        tokenizer = shards.tokenizer_of(shard_dirs["path"]) if "path" in shard_dirs else Tokenizer.gpt2()
    for key, directory in shard_dirs.items():
        _check_tokenizer(shards.read_index(directory)["tokenizer"], tokenizer, f"data.{key}={directory}")

    def read(path: str, split: str) -> list[str]:
        return sources.read_documents(location(path), format=cfg.format, text_field=cfg.text_field,
                                      separator=cfg.separator, tfds_split=split,
                                      tfds_data_dir=cfg.data_dir)

    def windows(docs: list[str]) -> WindowSource:
        return WindowSource.from_documents(tokenize_documents(docs, tokenizer), seq_len=cfg.seq_len,
                                           pad_id=tokenizer.pad_id, packing=cfg.packing)

    def shard_windows(key: str, split: str) -> shards.ShardWindowSource:
        return shards.ShardWindowSource(shard_dirs[key], split, seq_len=cfg.seq_len, pad_id=tokenizer.pad_id)

    if "path" in shard_dirs:
        train = shard_windows("path", "train")
        if not cfg.val_path:
            val = shard_windows("path", "val")
        else:
            val = shard_windows("val_path", "val") if "val_path" in shard_dirs else windows(
                read(cfg.val_path, cfg.tfds_val_split or cfg.tfds_split))
        return LMData(cfg, train, val, process_index, process_count, tokenizer)

    train_docs = read(cfg.path, cfg.tfds_split)
    if "val_path" in shard_dirs:
        return LMData(cfg, windows(train_docs), shard_windows("val_path", "val"), process_index, process_count,
                      tokenizer)
    if cfg.val_path:
        val_docs = read(cfg.val_path, cfg.tfds_val_split or cfg.tfds_split)
    elif cfg.format == "tfds" and cfg.tfds_val_split:
        val_docs = read(cfg.path, cfg.tfds_val_split)
    else:
        train_docs, val_docs = sources.split_documents(train_docs, cfg.val_fraction)
    return LMData(cfg, windows(train_docs), windows(val_docs), process_index, process_count, tokenizer)


def _locate(path: str, data_dir: str):
    """A URL (`gs://...`: a shard directory on a bucket) as an `epath`; else under the data dir."""
    return epath.Path(path) if "://" in path else sources.resolve_path(path, data_dir)


def _check_tokenizer(written: dict, tokenizer: Tokenizer, where: str) -> None:
    ours = {"vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id, "pad_id": tokenizer.pad_id}
    theirs = {k: written[k] for k in ours}
    if ours != theirs:
        raise sources.DataError(f"{where}: its shards hold ids of tokenizer {written['name']!r} {theirs}, "
                                f"but this run uses {tokenizer.name!r} {ours}. Re-process the corpus with "
                                "this tokenizer, or run with the shards' one.")


def _local_batch_size(batch_size: int, process_count: int) -> int:
    if batch_size % process_count:
        raise ConfigError(f"data.batch_size={batch_size} must be divisible by the number of "
                          f"processes ({process_count}); each process loads batch_size / processes rows.")
    return batch_size // process_count
