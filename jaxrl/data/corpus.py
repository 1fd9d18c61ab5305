"""Corpus processing: manifest -> normalise -> filter -> dedup -> mix -> tokenise -> pack -> ArrayRecord shards.

    python -m jaxrl.data process MANIFEST --out DIR

Stages, each counted per source in `DIR/stats.json` (documents in and out):
  read       a source's files, up to its limits (text: one document per file or split on
             `separator`; JSONL: one per row, streamed). Files that are not UTF-8 are skipped
             and listed.
  normalise  Unicode NFC/NFKC, CRLF -> LF, trailing spaces stripped; empty documents dropped.
  filter     length, symbol ratio, repeated-line fraction, top word-bigram fraction.
  dedup      exact (BLAKE2b of the normalised text), then near-duplicate (datasketch MinHash
             LSH over word shingles); the first occurrence in manifest order is kept.
  mix        a document is written `weight` times on average, decided by its hash.
  split      a document goes to `val` when its hash falls under `val_fraction`.
  shard      documents, in manifest order, grouped into shards of ~`shard_chars` per split;
             each shard is tokenised (EOT after every document), packed into one stream and
             cut into records of `record_tokens` ids (the shard's last record is shorter).

Parallel: reading, cleaning and MinHash signatures run per file in a process pool, and
shards are written per shard in it; only the dedup decisions run in the main process, which
holds ~`num_perm` * 4 bytes per document (signatures) and the LSH tables, never the text.

Restartable: `DIR/plan.json` (which document goes to which shard, and the counts so far) is
written before any shard. A re-run with the same manifest reuses it and skips every shard
already complete: a shard is written under a temporary name and renamed once closed, after
its `.json` sidecar. `index.json` is written last; its presence means the directory is done.
A trained tokenizer is copied in as `tokenizer.json`, so the directory names its own ids.
Documents are re-read from the sources when their shard is written, so the sources must not
change between the plan and the last shard.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import datasketch
import numpy as np
import xxhash
from array_record.python.array_record_module import ArrayRecordWriter

from jaxrl.core.config import ConfigError
from jaxrl.data import shards, sources
from jaxrl.data.manifest import FilterConfig, Manifest, NormalizeConfig, SourceConfig, fingerprint, source_files
from jaxrl.data.tokenizer import Tokenizer

PLAN = "plan.json"
STATS = "stats.json"
_WORDS = re.compile(r"\w+")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)


# ---------------------------------------------------------------- per-document functions


def iter_file(file: Path, source: SourceConfig) -> Iterator[str]:
    """The raw documents of one file, in order, one at a time (JSONL is streamed row by row).

    Raises UnicodeDecodeError for a file that is not UTF-8, and DataError naming the file and
    line for a malformed JSONL row.
    """
    if sources.infer_format(file, source.format) != "jsonl":
        text = file.read_text(encoding="utf-8")
        yield from text.split(source.separator) if source.separator else [text]
        return
    for where, row in sources.jsonl_rows(file):
        yield sources._text_of(row, source.text_field, where)


def normalize(text: str, cfg: NormalizeConfig) -> str:
    if cfg.unicode != "none":
        text = unicodedata.normalize(cfg.unicode, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg.strip_trailing_spaces:
        text = _TRAILING.sub("", text)
    return text.strip("\n")


def filter_reason(text: str, cfg: FilterConfig) -> str | None:
    """Why `text` is dropped (a stats key), or None to keep it."""
    if len(text) < cfg.min_chars:
        return "too_short"
    if cfg.max_chars and len(text) > cfg.max_chars:
        return "too_long"
    visible = [c for c in text if not c.isspace()]
    if visible and sum(not c.isalnum() for c in visible) / len(visible) > cfg.max_symbol_ratio:
        return "symbols"
    words = _WORDS.findall(text)
    if len(words) < cfg.min_words_for_ratios:
        return None
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    counts = collections.Counter(lines)
    repeated = sum(len(line) for line in lines if counts[line] > 1)
    if repeated / max(1, sum(map(len, lines))) > cfg.max_repeated_line_fraction:
        return "repeated_lines"
    (top, n), = collections.Counter(zip(words, words[1:])).most_common(1)
    if n > 1 and n * (len(top[0]) + len(top[1])) / sum(map(len, words)) > cfg.max_top_bigram_fraction:
        return "repeated_ngrams"
    return None


def _xxh32(data: bytes) -> int:
    return xxhash.xxh32_intdigest(data)


def minhash(text: str, *, num_perm: int, shingle_words: int, seed: int) -> np.ndarray | None:
    """MinHash signature (uint32[num_perm]) of the word shingles of `text`; None without words."""
    words = _WORDS.findall(text.lower())
    if not words:
        return None
    n = min(shingle_words, len(words))
    shingles = {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}
    mh = datasketch.MinHash(num_perm=num_perm, seed=seed, hashfunc=_xxh32, scheme="affine32")
    mh.update_batch(list(shingles))
    return mh.hashvalues.astype(np.uint32)


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _unit(d: bytes, part: int) -> float:
    """A uniform number in [0, 1) from 8 bytes of a digest (0: mixing, 1: the split)."""
    return int.from_bytes(d[8 * part:8 * part + 8], "little") / 2**64


def copies(d: bytes, weight: float) -> int:
    whole = int(weight)
    return whole + (_unit(d, 0) < weight - whole)


# ---------------------------------------------------------------- stage 1: per file, in workers


@dataclasses.dataclass
class FileSummary:
    """What the main process needs of one file's documents: no text, only decisions and hashes."""

    file_id: int
    undecodable: bool
    chars: list[int]  # per raw document, after normalising
    reasons: list[str | None]  # "empty", a filter reason, or None (kept)
    digests: list[bytes]
    signatures: np.ndarray  # uint32[kept with words, num_perm]
    signed: list[int]  # document indices that have a signature row


def summarize_file(task) -> FileSummary:
    file_id, file, source, manifest = task
    chars, reasons, digests, sigs, signed = [], [], [], [], []
    try:
        for i, doc in enumerate(iter_file(file, source)):
            text = normalize(doc, manifest.normalize)
            reason = "empty" if not text else filter_reason(text, manifest.filter)
            chars.append(len(text))
            reasons.append(reason)
            digests.append(digest(text))
            if reason is None and manifest.dedup.near:
                sig = minhash(text, num_perm=manifest.dedup.num_perm, shingle_words=manifest.dedup.shingle_words,
                              seed=manifest.dedup.seed)
                if sig is not None:
                    sigs.append(sig)
                    signed.append(i)
    except UnicodeDecodeError:
        return FileSummary(file_id, True, [], [], [], np.zeros((0, manifest.dedup.num_perm), np.uint32), [])
    sig_array = np.stack(sigs) if sigs else np.zeros((0, manifest.dedup.num_perm), np.uint32)
    return FileSummary(file_id, False, chars, reasons, digests, sig_array, signed)


# ---------------------------------------------------------------- stage 2: decisions, in the main process


def _new_counts() -> dict:
    return {"files": 0, "undecodable_files": [], "read": 0, "over_limit": 0, "empty": 0, "filtered": {},
            "after_filter": 0, "exact_duplicates": 0, "near_duplicates": 0, "after_dedup": 0,
            "after_mix": 0, "chars": 0, "train_docs": 0, "val_docs": 0}


def make_plan(manifest: Manifest, pool) -> dict:
    """Read and clean every source, dedup across the whole mixture, and assign documents to shards."""
    files, tasks = [], []
    for source in manifest.sources:
        for file in source_files(source, manifest.data_dir):
            tasks.append((len(files), file, source, manifest))
            files.append({"path": str(file), "source": source.name})
    by_name = {s.name: s for s in manifest.sources}
    counts = {s.name: _new_counts() for s in manifest.sources}
    seen: set[bytes] = set()
    lsh = datasketch.MinHashLSH(threshold=manifest.dedup.threshold, num_perm=manifest.dedup.num_perm)
    kept_sigs: dict[tuple[int, int], np.ndarray] = {}
    taken = collections.Counter()  # per source: documents and characters within its limits
    taken_chars = collections.Counter()
    shard_chars = {"train": 0, "val": 0}  # in the split's open shard
    shard_lists: dict[str, list[list[list[int]]]] = {"train": [[]], "val": [[]]}
    out = manifest.output
    for summary in pool.imap(summarize_file, tasks):
        name = files[summary.file_id]["source"]
        source, c = by_name[name], counts[name]
        c["files"] += 1
        if summary.undecodable:
            c["undecodable_files"].append(files[summary.file_id]["path"])
            continue
        sig_of = dict(zip(summary.signed, summary.signatures))
        for i, (n_chars, reason, d) in enumerate(zip(summary.chars, summary.reasons, summary.digests)):
            if (source.max_docs and taken[name] >= source.max_docs) or \
                    (source.max_chars and taken_chars[name] >= source.max_chars):
                c["over_limit"] += 1
                continue
            taken[name] += 1
            taken_chars[name] += n_chars
            c["read"] += 1
            if reason == "empty":
                c["empty"] += 1
                continue
            if reason is not None:
                c["filtered"][reason] = c["filtered"].get(reason, 0) + 1
                continue
            c["after_filter"] += 1
            if manifest.dedup.exact:
                if d in seen:
                    c["exact_duplicates"] += 1
                    continue
                seen.add(d)
            sig = sig_of.get(i)
            if sig is not None:
                key, lean = (summary.file_id, i), _lean(sig, manifest)
                # LSH candidates are only likely matches: confirm with the signatures' estimate.
                if any(np.mean(kept_sigs[k] == sig) >= manifest.dedup.threshold for k in lsh.query(lean)):
                    c["near_duplicates"] += 1
                    continue
                lsh.insert(key, lean, check_duplication=False)
                kept_sigs[key] = sig
            c["after_dedup"] += 1
            k = copies(d, source.weight)
            if not k:
                continue
            split = "val" if _unit(d, 1) < out.val_fraction else "train"
            c["after_mix"] += k
            c["chars"] += k * n_chars
            c[f"{split}_docs"] += k
            shard_lists[split][-1].extend([[summary.file_id, i]] * k)
            shard_chars[split] += k * n_chars
            if shard_chars[split] >= out.shard_chars:
                shard_lists[split].append([])
                shard_chars[split] = 0
    plan_shards = []
    for split in ("train", "val"):
        groups = [g for g in shard_lists[split] if g]
        plan_shards += [{"name": f"{split}-{k:05d}", "split": split, "docs": g} for k, g in enumerate(groups)]
    if not any(s["split"] == "train" for s in plan_shards):
        raise sources.DataError("no documents survived cleaning for the train split; see the counts: "
                                f"{json.dumps(counts)}")
    return {"manifest_sha256": fingerprint(manifest), "files": files, "shards": plan_shards, "counts": counts}


def _lean(sig: np.ndarray, manifest: Manifest) -> datasketch.LeanMinHash:
    return datasketch.LeanMinHash(seed=manifest.dedup.seed, hashvalues=sig, scheme="affine32")


# ---------------------------------------------------------------- stage 3: one shard, in a worker


def write_shard(task) -> dict:
    """Tokenise, pack and write one shard; returns (and leaves beside it) its sidecar counts."""
    out_dir, shard, files, manifest, record_dtype = task
    by_name = {s.name: s for s in manifest.sources}
    tokenizer = Tokenizer.from_spec(manifest.tokenizer)
    wanted = collections.defaultdict(set)
    for file_id, i in shard["docs"]:
        wanted[file_id].add(i)
    found = {}  # only this shard's documents are held, each once however often it repeats
    for file_id, indices in wanted.items():
        last = max(indices)
        for i, raw in enumerate(iter_file(Path(files[file_id]["path"]), by_name[files[file_id]["source"]])):
            if i in indices:
                found[file_id, i] = normalize(raw, manifest.normalize)
            if i == last:
                break
    texts = [found[file_id, i] for file_id, i in shard["docs"]]
    names = [files[file_id]["source"] for file_id, _ in shard["docs"]]
    ids = tokenizer.encode_batch(texts, num_threads=1)
    tokens_by_source = collections.Counter()
    for name, row in zip(names, ids):
        tokens_by_source[name] += len(row) + 1
    stream = np.concatenate([np.array([*row, tokenizer.eot_id], record_dtype) for row in ids])
    path = Path(out_dir) / f"{shard['name']}{shards.SUFFIX}"
    tmp = path.with_name(path.name + ".tmp")
    writer = ArrayRecordWriter(str(tmp), shards.WRITER_OPTIONS)
    step = manifest.output.record_tokens
    for start in range(0, len(stream), step):
        writer.write(stream[start:start + step].tobytes())
    writer.close()
    meta = {"file": path.name, "split": shard["split"], "tokens": int(len(stream)),
            "records": -(-len(stream) // step), "docs": len(texts), "tokens_by_source": dict(tokens_by_source)}
    path.with_suffix(".json").write_text(json.dumps(meta) + "\n")
    os.replace(tmp, path)
    return meta


def _shard_done(out_dir: Path, name: str) -> dict | None:
    path = out_dir / f"{name}{shards.SUFFIX}"
    if path.is_file() and path.with_suffix(".json").is_file():
        return json.loads(path.with_suffix(".json").read_text())
    return None


# ---------------------------------------------------------------- the command


def process(manifest: Manifest, out_dir: str | Path, *, log=print) -> dict:
    """Run every stage into `out_dir` (resuming a previous run of the same manifest); -> stats."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tokenizer = Tokenizer.from_spec(manifest.tokenizer)
    record_dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    workers = manifest.workers or os.cpu_count() or 1
    with pool(workers) as workers_pool:
        plan_path = out_dir / PLAN
        if plan_path.is_file():
            plan = json.loads(plan_path.read_text())
            if plan["manifest_sha256"] != fingerprint(manifest):
                raise ConfigError(f"{out_dir} holds the output of a different manifest (plan.json); "
                                  "use a new --out directory or delete it.")
            log(f"[corpus] resuming: plan.json has {len(plan['shards'])} shards")
        else:
            plan = make_plan(manifest, workers_pool)
            _write_json(plan_path, plan)
            log(f"[corpus] planned {len(plan['shards'])} shards from {len(plan['files'])} files")
        done = {s["name"]: meta for s in plan["shards"] if (meta := _shard_done(out_dir, s["name"]))}
        todo = [(str(out_dir), s, plan["files"], manifest, record_dtype) for s in plan["shards"] if s["name"] not in done]
        if done:
            log(f"[corpus] {len(done)} shards already written, {len(todo)} to go")
        for meta in workers_pool.imap(write_shard, todo):
            done[meta["file"].removesuffix(shards.SUFFIX)] = meta
            log(f"[corpus] wrote {meta['file']}: {meta['docs']} docs, {meta['tokens']} tokens")
    metas = [done[s["name"]] for s in plan["shards"]]
    name = tokenizer.name
    if name != "gpt2":  # the directory carries its trained tokenizer, so it stays usable when moved
        shutil.copyfile(Path(name) / "tokenizer.json", out_dir / "tokenizer.json")
        name = "tokenizer.json"
    index = {
        "format": shards.FORMAT, "version": 1,
        "tokenizer": {"name": name, "vocab_size": tokenizer.vocab_size,
                      "eot_id": tokenizer.eot_id, "pad_id": tokenizer.pad_id},
        "dtype": np.dtype(record_dtype).name, "record_tokens": manifest.output.record_tokens,
        "splits": {split: [{k: m[k] for k in ("file", "tokens", "records", "docs")}
                           for m in metas if m["split"] == split] for split in ("train", "val")},
    }
    stats = _stats(plan, metas, index, workers, time.perf_counter() - start)
    _write_json(out_dir / STATS, stats)
    _write_json(out_dir / shards.INDEX, index)
    return stats


def _stats(plan: dict, metas: list[dict], index: dict, workers: int, seconds: float) -> dict:
    counts = plan["counts"]
    tokens = collections.Counter()
    for m in metas:
        tokens.update(m["tokens_by_source"])
    for name, c in counts.items():
        c["tokens"] = tokens[name]
    total = {k: sum(c[k] for c in counts.values()) for k in counts[next(iter(counts))]
             if isinstance(counts[next(iter(counts))][k], int)}
    total["filtered"] = dict(sum((collections.Counter(c["filtered"]) for c in counts.values()), collections.Counter()))
    return {
        "sources": counts,
        "total": total,
        "tokens": {split: sum(s["tokens"] for s in index["splits"][split]) for split in index["splits"]},
        "shards": {split: len(index["splits"][split]) for split in index["splits"]},
        "records": {split: sum(s["records"] for s in index["splits"][split]) for split in index["splits"]},
        "tokenizer": index["tokenizer"],
        "workers": workers,
        "seconds_this_run": round(seconds, 1),
    }


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class _Inline:
    """A one-process stand-in with the pool's `imap`, so `workers: 1` runs without forking."""

    def imap(self, fn, items):
        return map(fn, items)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def pool(workers: int):
    """A process pool of `workers` (or the in-process stand-in for one)."""
    if workers == 1:
        return _Inline()
    # forkserver: the caller may hold JAX / Grain threads, which fork would copy mid-flight.
    return multiprocessing.get_context("forkserver").Pool(workers)
