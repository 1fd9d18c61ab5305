"""Document readers: text files, JSONL and TFDS -> `list[str]`, plus prompt lists for RL.

A *document* is the unit that ends with `<|endoftext|>` after tokenization. Text files give
one document per file, or several when `separator` is set (e.g. "\\n\\n" for blank lines);
JSONL gives one document per row (`text_field`); TFDS gives one per record.

Every reader fails loudly on bad input, naming the file (and line) and the fix: a missing
path, an empty file, a malformed JSONL row or a row without the text field.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

Format = Literal["auto", "text", "jsonl", "tfds"]

_JSONL_SUFFIXES = (".jsonl", ".ndjson")


class DataError(ValueError):
    """Input data that cannot be used as given; the message names the file and the fix."""


def default_data_dir() -> Path:
    """`$JAXRL_DATA_DIR`, else the read-only `../shared/data` next to the repo, else the CWD."""
    if env := os.environ.get("JAXRL_DATA_DIR"):
        return Path(env)
    shared = Path(__file__).resolve().parents[3] / "shared" / "data"
    return shared if shared.is_dir() else Path.cwd()


def resolve_path(path: str, data_dir: str = "") -> Path:
    """An absolute `path` stays; a relative one is taken under `data_dir` (default: above)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    return Path(data_dir).expanduser() / p if data_dir else default_data_dir() / p


def list_files(path: str | Path, format: Format = "auto") -> list[Path]:
    """A file, a directory (its text/JSONL files, sorted) or a glob pattern -> sorted files."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        suffixes = {"text": (".txt",), "jsonl": _JSONL_SUFFIXES}.get(format, (".txt", *_JSONL_SUFFIXES))
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes)
        if not files:
            raise DataError(f"{path}: directory has no {'/'.join(suffixes)} files. "
                            "Point `path` at a file, or put documents in the directory.")
        return files
    files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(
            f"{path}: no such file, directory or glob match. Check `path` (relative paths are "
            f"resolved under the data dir, default {default_data_dir()}; set JAXRL_DATA_DIR or "
            "`data_dir` to change it).")
    return files


def infer_format(file: Path, format: Format) -> Literal["text", "jsonl", "tfds"]:
    if format != "auto":
        return format
    return "jsonl" if file.suffix in _JSONL_SUFFIXES else "text"


def read_text_documents(file: Path, separator: str = "") -> list[str]:
    """The file as one document, or split on `separator` (empty pieces dropped, each stripped)."""
    text = _read_nonempty(file)
    if not separator:
        return [text]
    docs = [d.strip() for d in text.split(separator)]
    return [d for d in docs if d]


def jsonl_rows(file: str | Path) -> Iterator[tuple[str, Any]]:
    """(`file:line`, row) for each non-blank line, streamed; a line that is not JSON is a
    DataError naming the file and line. Every JSONL reader in jaxrl goes through here."""
    with open(file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}:{line_no}: malformed JSON ({e.msg} at column {e.colno}). "
                                "Each line must be one JSON object; fix or delete that line.") from None
            yield f"{file}:{line_no}", row


def read_jsonl_documents(file: Path, text_field: str = "text") -> list[str]:
    """One document per JSONL row from `row[text_field]`; blank lines are skipped."""
    _read_nonempty(file)
    docs = [_text_of(row, text_field, where) for where, row in jsonl_rows(file)]
    if not docs:
        raise DataError(f"{file}: no JSON rows (only blank lines). Give a file with one object per line.")
    return docs


def read_tfds_documents(name: str, *, split: str, text_field: str = "text", data_dir: str = "") -> list[str]:
    """Documents from a prepared TFDS dataset through `tfds.data_source` (ArrayRecord, no TF)."""
    import tensorflow_datasets as tfds  # slow import; only TFDS users pay for it

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # tfds raises several types for "not prepared"/"unknown"
        raise DataError(f"TFDS dataset {name!r} split {split!r}: {e}. Prepare it first "
                        "(`tfds build` with ArrayRecord format) and set `data_dir`.") from e
    return documents_from_records(source, text_field, f"tfds:{name}[{split}]")


def documents_from_records(records: Iterable[Mapping], text_field: str, where: str) -> list[str]:
    """Text of each record's `text_field` (str or UTF-8 bytes, as TFDS gives it)."""
    docs = [_text_of(row, text_field, f"{where} record {i}") for i, row in enumerate(records)]
    if not docs:
        raise DataError(f"{where}: no records.")
    return docs


def read_documents(
    path: str | Path,
    *,
    format: Format = "auto",
    text_field: str = "text",
    separator: str = "",
    tfds_split: str = "train",
    tfds_data_dir: str = "",
) -> list[str]:
    """All documents under `path` (file, directory or glob; for TFDS the dataset name)."""
    if format == "tfds":
        return read_tfds_documents(str(path), split=tfds_split, text_field=text_field, data_dir=tfds_data_dir)
    docs = []
    for file in list_files(path, format):
        if infer_format(file, format) == "jsonl":
            docs += read_jsonl_documents(file, text_field)
        else:
            docs += read_text_documents(file, separator)
    return docs


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the last `val_fraction` of documents for validation.

    A corpus of one document (tinyshakespeare) is split inside it instead, at the line break
    nearest to the fraction of its characters, so train and validation never share a line.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    if len(docs) == 1:
        text = docs[0]
        cut = text.rfind("\n", 0, round(len(text) * (1.0 - val_fraction))) + 1
        if cut <= 0 or cut >= len(text):
            raise DataError("cannot split a single one-line document into train/validation; "
                            "give `val_path` or a corpus with more lines.")
        return [text[:cut]], [text[cut:]]
    n_val = max(1, round(len(docs) * val_fraction))
    if n_val >= len(docs):
        raise DataError(f"val_fraction={val_fraction} leaves no training documents out of {len(docs)}.")
    return docs[:-n_val], docs[-n_val:]


def load_prompts(
    path: str | Path,
    *,
    format: Format = "auto",
    text_field: str = "prompt",
    prefix_tokens: int = 0,
    separator: str = "\n\n",
    tokenizer=None,
    limit: int = 0,
) -> list[str]:
    """Prompts for RL generation.

    - `prefix_tokens == 0`: a text file gives one prompt per non-blank line; JSONL gives
      `row[text_field]` per row.
    - `prefix_tokens > 0`: corpus mode, the first `prefix_tokens` tokens of each document
      (text documents split on `separator`, JSONL rows by `text_field`), decoded back to text.
    `limit > 0` keeps the first `limit` prompts.
    """
    files = list_files(path, format)
    if prefix_tokens > 0:
        if tokenizer is None:
            from jaxrl.data.tokenizer import Tokenizer

            tokenizer = Tokenizer.gpt2()
        docs = read_documents(path, format=format, text_field=text_field, separator=separator)
        prompts = [tokenizer.decode(ids[:prefix_tokens]) for ids in tokenizer.encode_batch(docs)]
    else:
        prompts = []
        for file in files:
            if infer_format(file, format) == "jsonl":
                prompts += read_jsonl_documents(file, text_field)
            else:
                prompts += [line for line in _read_nonempty(file).splitlines() if line.strip()]
    return prompts[:limit] if limit > 0 else prompts


def _read_nonempty(file: Path) -> str:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file. Check the data path.")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start}). "
                        "Re-encode the file as UTF-8.") from None
    if not text.strip():
        raise DataError(f"{file}: file is empty. Give a file with text, or remove it from `path`.")
    return text


def _text_of(row, text_field: str, where: str) -> str:
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    if text_field not in row:
        fields = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(f"{where}: no field {text_field!r} (fields: {fields}). "
                        "Set `text_field` to the field that holds the text.")
    value = row[text_field]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy scalar from TFDS
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} must be a string, got {type(value).__name__}.")
    return value
