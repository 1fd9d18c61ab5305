"""Corpus manifests: which sources make a mixture, and how they are cleaned, mixed and sharded.

A manifest is a YAML file typed by `Manifest` (unknown keys and wrong types fail naming the
key and the file, as run configs do). One manifest drives both commands:

    python -m jaxrl.data tokenizer MANIFEST --out DIR   # train a BPE on the cleaned mixture
    python -m jaxrl.data process MANIFEST --out DIR     # clean, dedup, tokenise, shard

Paths are files, directories or globs (`**` recurses), relative to `data_dir` (default: the
data dir of `jaxrl.data.sources`); `{stdlib}` expands to this Python's standard library.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import sysconfig
from pathlib import Path
from typing import Literal

from jaxrl.core.config import ConfigError, build, merge, read_yaml
from jaxrl.data import sources


@dataclasses.dataclass
class SourceConfig:
    """One source of the mixture: its files, how they split into documents, its weight and limits."""

    name: str = ""
    path: str = ""  # file, directory or glob (`**` recurses); `{stdlib}`: the Python standard library
    exclude: list[str] = dataclasses.field(default_factory=list)  # fnmatch patterns, relative to the path's root
    format: Literal["auto", "text", "jsonl"] = "auto"
    text_field: str = "text"  # JSONL field with the text
    separator: str = ""  # text files: "" = one document per file, else split on it
    weight: float = 1.0  # copies of each surviving document on average: 0.5 keeps half, 2 doubles
    max_docs: int = 0  # limit: the first N documents read (0: no limit)
    max_chars: int = 0  # limit: stop reading after this many characters (0: no limit)

    def validate(self):
        if not self.name or not self.path:
            raise ConfigError("every source needs a `name` and a `path`.")
        if self.weight < 0:
            raise ConfigError(f"source {self.name!r}: weight must be >= 0, got {self.weight}.")
        if self.max_docs < 0 or self.max_chars < 0:
            raise ConfigError(f"source {self.name!r}: max_docs / max_chars must be >= 0.")


@dataclasses.dataclass
class NormalizeConfig:
    """Text normalisation applied to every document before filtering, dedup and tokenising."""

    unicode: Literal["NFC", "NFKC", "none"] = "NFC"
    strip_trailing_spaces: bool = True  # per line; also CRLF -> LF and outer blank lines dropped


@dataclasses.dataclass
class FilterConfig:
    """Language-free quality heuristics; a document failing any is dropped (counted by reason)."""

    min_chars: int = 32
    max_chars: int = 0  # 0: no upper limit
    max_symbol_ratio: float = 0.6  # non-space characters that are neither letters nor digits
    max_repeated_line_fraction: float = 0.5  # characters in non-blank lines that occur more than once
    max_top_bigram_fraction: float = 0.3  # characters of words in the most frequent word bigram
    min_words_for_ratios: int = 32  # repetition checks need this many words to mean anything

    def validate(self):
        for name in ("max_symbol_ratio", "max_repeated_line_fraction", "max_top_bigram_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"filter.{name} must be in (0, 1] (1 disables it), got {getattr(self, name)}.")
        if self.min_chars < 0 or self.max_chars < 0:
            raise ConfigError("filter.min_chars / max_chars must be >= 0.")


@dataclasses.dataclass
class DedupConfig:
    """Exact dedup by hash, then near-duplicate dedup by MinHash LSH over word shingles."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # estimated Jaccard similarity at or above which a later document is dropped
    num_perm: int = 128
    shingle_words: int = 5
    seed: int = 1

    def validate(self):
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"dedup.threshold must be in (0, 1], got {self.threshold}.")
        if self.num_perm < 16 or self.shingle_words < 1:
            raise ConfigError("dedup.num_perm must be >= 16 and dedup.shingle_words >= 1.")


@dataclasses.dataclass
class OutputConfig:
    """How cleaned documents become ArrayRecord shards."""

    record_tokens: int = 2048  # ids per ArrayRecord record of the packed stream
    shard_chars: int = 4_000_000  # characters of text per shard (about 1M GPT-2 tokens)
    val_fraction: float = 0.01  # documents held out for validation, chosen by their hash

    def validate(self):
        if self.record_tokens < 2 or self.shard_chars < 1:
            raise ConfigError("output.record_tokens must be >= 2 and output.shard_chars >= 1.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"output.val_fraction must be in [0, 1), got {self.val_fraction}.")


@dataclasses.dataclass
class TokenizerTrainConfig:
    """Byte-level BPE training (Hugging Face `tokenizers`) on the cleaned, weighted mixture."""

    vocab_size: int = 8192  # including the two special tokens
    min_frequency: int = 2
    max_chars: int = 0  # sample at most this many characters, shared by weight (0: everything)

    def validate(self):
        if self.vocab_size < 258:
            raise ConfigError(f"train_tokenizer.vocab_size must be >= 258 (256 bytes + 2 specials), "
                              f"got {self.vocab_size}.")


@dataclasses.dataclass
class Manifest:
    sources: list[SourceConfig] = dataclasses.field(default_factory=list)
    data_dir: str = ""  # root for relative paths; empty: $JAXRL_DATA_DIR or ../shared/data
    normalize: NormalizeConfig = dataclasses.field(default_factory=NormalizeConfig)
    filter: FilterConfig = dataclasses.field(default_factory=FilterConfig)
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig)
    tokenizer: str = "gpt2"  # "gpt2" or a trained tokenizer's directory (relative: to the working dir)
    train_tokenizer: TokenizerTrainConfig = dataclasses.field(default_factory=TokenizerTrainConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    workers: int = 0  # processes; 0: one per core

    def validate(self):
        if not self.sources:
            raise ConfigError("'sources' is empty: list at least one {name, path}.")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"source names must be unique, got {names}.")


def load_manifest(path: str | Path, overrides: dict | None = None) -> Manifest:
    """The typed manifest at `path`; errors name the key and the file."""
    data = read_yaml(path)
    data = merge(data, overrides or {})
    return build(Manifest, data, source=str(path))


def fingerprint(manifest: Manifest) -> str:
    """SHA-256 of the resolved manifest but `workers`: an output directory belongs to one manifest."""
    data = {k: v for k, v in dataclasses.asdict(manifest).items() if k != "workers"}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def source_files(source: SourceConfig, data_dir: str = "") -> list[Path]:
    """The source's files, sorted, minus `exclude`; a path matching nothing names the source."""
    raw = source.path.replace("{stdlib}", sysconfig.get_paths()["stdlib"])
    root = sources.resolve_path(raw, data_dir)
    try:
        files = sources.list_files(root, source.format)
    except (FileNotFoundError, sources.DataError) as e:
        raise ConfigError(f"source {source.name!r}: {e}") from None
    base = root if root.is_dir() else Path(*[p for p in root.parts if not any(c in p for c in "*?[")])
    kept = [f for f in files
            if not any(fnmatch.fnmatch(f.relative_to(base).as_posix(), pat) for pat in source.exclude)]
    if not kept:
        raise ConfigError(f"source {source.name!r}: every file under {root} is excluded by {source.exclude}.")
    return kept
