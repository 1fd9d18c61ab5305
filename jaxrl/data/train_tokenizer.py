"""Train a byte-level BPE tokenizer on a manifest's mixture (Hugging Face `tokenizers`).

    python -m jaxrl.data tokenizer MANIFEST --out DIR [--vocab-size N]

The text is the manifest's, cleaned as `corpus` cleans it (normalise, filter, exact dedup;
near-duplicates are left in, which only nudges merge counts), with each source's documents
repeated or subsampled by its `weight` and, when `train_tokenizer.max_chars` is set, that
budget shared between sources by weight. The pre-tokeniser is GPT-2's (so `Tokenizer.load`
runs the result on tiktoken with the same ids); the 256 byte tokens are always present, so
any text encodes. `<|endoftext|>` and `<|pad|>` take the last two ids, as in GPT-2's layout.
`DIR/tokenizer.json` is a standard Hugging Face tokenizer file; `DIR/tokenizer_stats.json`
says what it was trained on.
"""

from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxrl.data import corpus
from jaxrl.data.manifest import Manifest, source_files
from jaxrl.data.tokenizer import EOT_TOKEN, PAD_TOKEN, Tokenizer


def clean_file(task) -> list[tuple[str | None, int, bytes]]:
    """Per raw document of one file: (its text if it survives normalising and filtering, chars, digest)."""
    file, source, manifest = task
    out = []
    try:
        for raw in corpus.iter_file(file, source):
            text = corpus.normalize(raw, manifest.normalize)
            keep = bool(text) and corpus.filter_reason(text, manifest.filter) is None
            out.append((text if keep else None, len(text), corpus.digest(text)))
    except UnicodeDecodeError:
        return []  # skipped, as `corpus` skips it
    return out


def train(manifest: Manifest, out_dir: str | Path, *, vocab_size: int = 0, log=print) -> Tokenizer:
    """Train, save `out_dir/tokenizer.json`, and return it loaded through `Tokenizer.load`."""
    cfg = manifest.train_tokenizer
    vocab_size = vocab_size or cfg.vocab_size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total_weight = sum(s.weight for s in manifest.sources) or 1.0
    budget = {s.name: cfg.max_chars * s.weight / total_weight for s in manifest.sources}
    taken, taken_chars, used, docs = (collections.Counter() for _ in range(4))
    seen: set[bytes] = set()
    start = time.perf_counter()

    def texts():
        """Cleaned documents in manifest order, within the sources' limits (counted as `corpus` does)."""
        tasks = [(f, s, manifest) for s in manifest.sources for f in source_files(s, manifest.data_dir)]
        with corpus.pool(manifest.workers or os.cpu_count() or 1) as pool:
            for (_, source, _), file_docs in zip(tasks, pool.imap(clean_file, tasks)):
                name = source.name
                for text, n_chars, d in file_docs:
                    if (source.max_docs and taken[name] >= source.max_docs) or \
                            (source.max_chars and taken_chars[name] >= source.max_chars) or \
                            (cfg.max_chars and used[name] >= budget[name]):
                        break
                    taken[name] += 1
                    taken_chars[name] += n_chars
                    if text is None or (manifest.dedup.exact and d in seen):
                        continue
                    seen.add(d)
                    for _ in range(corpus.copies(d, source.weight)):
                        used[name] += len(text)
                        docs[name] += 1
                        yield text

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, min_frequency=cfg.min_frequency,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts(), trainer)
    hf.add_special_tokens([EOT_TOKEN, PAD_TOKEN])
    hf.save(str(out_dir / "tokenizer.json"))
    tokenizer = Tokenizer.load(out_dir)
    stats = {"vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id, "pad_id": tokenizer.pad_id,
             "docs": dict(docs), "chars": dict(used), "seconds": round(time.perf_counter() - start, 1)}
    (out_dir / "tokenizer_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    log(f"[tokenizer] {tokenizer} from {sum(docs.values())} documents, {sum(used.values())} chars")
    if tokenizer.vocab_size < vocab_size:
        log(f"[tokenizer] note: the text supports only {tokenizer.vocab_size} of the {vocab_size} ids asked "
            f"for (no pair occurs min_frequency={cfg.min_frequency} times any more)")
    return tokenizer
