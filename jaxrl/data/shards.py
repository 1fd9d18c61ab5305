"""Reading a shard directory (written by `jaxrl.data.corpus`): windows of a packed token stream.

A shard directory holds, per split (`train`, `val`), ArrayRecord files whose records are
consecutive pieces of one packed token stream (documents end with `<|endoftext|>`), and an
`index.json` naming the files in stream order with their token and record counts, the dtype,
the record length and the tokenizer (GPT-2's, or a trained one's
`tokenizer.json` beside the index).

`ShardWindowSource` gives random access to the same windows `lm.WindowSource` cuts from an
in-memory packed stream (start every `seq_len` tokens, `seq_len + 1` long, the last one
padded), reading only the one or two records a window touches. So the Grain pipeline of
`lm.train_dataset` runs on it unchanged: a global shuffle of window indices, each host
taking its own indices (and reading only their records), and an iterator state that is a
step count, so resume is exact. Memory is a few numbers per shard, not per token.
"""

from __future__ import annotations

import json

import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource
from etils import epath

from jaxrl.data.sources import DataError
from jaxrl.data.tokenizer import Tokenizer

INDEX = "index.json"
FORMAT = "jaxrl-lm-shards"
SUFFIX = ".array_record"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: a window read decodes only what it needs
SPLITS = ("train", "val")


def is_shard_dir(path) -> bool:
    return (epath.Path(path) / INDEX).is_file()


def read_index(directory) -> dict:
    """The parsed `index.json` of a shard directory; a bad one is named with what is wrong."""
    path = epath.Path(directory) / INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; {directory} is not a finished shard directory "
                        "(run `python -m jaxrl.data process MANIFEST --out DIR` to make or finish one).") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
    missing = [k for k in ("format", "tokenizer", "dtype", "record_tokens", "splits") if k not in index]
    if missing or index.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} index (missing keys: {missing or 'none'}, "
                        f"format {index.get('format')!r}).")
    return index


def tokenizer_of(directory) -> Tokenizer:
    """The tokenizer whose ids the shards hold: GPT-2's, or the trained one copied into the directory."""
    name = read_index(directory)["tokenizer"]["name"]
    return Tokenizer.gpt2() if name == "gpt2" else Tokenizer.load(epath.Path(directory) / name)


class ShardWindowSource:
    """Window i = stream[i*T : i*T + T + 1] of one split, right-padded; Grain's `MapDataset.source` reads it."""

    def __init__(self, directory, split: str, *, seq_len: int, pad_id: int):
        index = read_index(directory)
        files = index["splits"].get(split) or []
        if not files:
            raise DataError(f"{epath.Path(directory) / INDEX}: split {split!r} has no shards "
                            f"(splits: {', '.join(k for k, v in index['splits'].items() if v) or 'none'}). "
                            "Give data.val_path, or re-process with output.val_fraction > 0.")
        self.directory, self.split = epath.Path(directory), split
        self.seq_len, self.pad_id = seq_len, pad_id
        self.tokenizer = index["tokenizer"]
        self._dtype = np.dtype(index["dtype"])
        self._record_tokens = int(index["record_tokens"])
        self._token_starts = np.cumsum([0] + [f["tokens"] for f in files])  # [shards + 1]
        self._record_starts = np.cumsum([0] + [f["records"] for f in files])
        self.num_tokens = int(self._token_starts[-1])
        # array_record's own source (Grain's subclass only adds tracing, and importing Grain
        # imports JAX: ~250 MB in every corpus worker, which imports this module's constants).
        self._records = ArrayRecordDataSource([str(self.directory / f["file"]) for f in files])

    def __len__(self) -> int:
        return -(-(self.num_tokens - 1) // self.seq_len) if self.num_tokens > 1 else 0

    def __getitem__(self, index: int) -> np.ndarray:
        start = int(index) * self.seq_len
        piece = self.read(start, min(start + self.seq_len + 1, self.num_tokens))
        window = np.full(self.seq_len + 1, self.pad_id, dtype=np.int32)
        window[: len(piece)] = piece
        return window

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's stream, from the records that hold them."""
        parts, pos = [], start
        while pos < stop:
            shard = int(np.searchsorted(self._token_starts, pos, side="right")) - 1
            offset = pos - int(self._token_starts[shard])
            record = offset // self._record_tokens
            first = int(self._token_starts[shard]) + record * self._record_tokens  # stream position of its id 0
            ids = np.frombuffer(self._records[int(self._record_starts[shard]) + record], dtype=self._dtype)
            parts.append(ids[pos - first : stop - first])
            pos += len(parts[-1])
        return np.concatenate(parts) if parts else np.zeros(0, self._dtype)

    @property
    def num_target_tokens(self) -> int:
        """Real (loss-counted) targets over one pass: every token after the first, once."""
        return max(self.num_tokens - 1, 0)
