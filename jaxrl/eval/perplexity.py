"""Perplexity of a token stream with a sliding window, and LAMBADA last-word prediction.

**Perplexity** (`perplexity`). The stream starts with `<|endoftext|>` so its first real token
is scored too; text files are tokenized document by document (`data.lm.tokenize_documents`,
each document ending in `<|endoftext|>`), a shard directory is read as its packed stream.
Windows of `window + 1` tokens start every `stride` tokens (stride <= window); each window
scores only the targets no earlier window scored, so every token after the first is scored
exactly once and, after the first window, with at least `window - stride` tokens of context
(stride = window: disjoint windows; HF's "perplexity of fixed-length models" rule).
Reported: `tokens` scored, `nll` (mean nats per token), `ppl` = exp(nll), `word_ppl` =
exp(total nll / whitespace-separated words) and `bits_per_byte` = total nll / (UTF-8 bytes
of the text * ln 2), the tokenizer-independent figures lm-eval-harness reports for WikiText.

**LAMBADA** (`lambada`): rows `{"context", "continuation"}`; the continuation (the last
word) is scored as " " + continuation by `zeroshot.encode_pair`. `acc`: every continuation
token is the model's argmax given the true prefix (greedy decoding would produce exactly the
word). `ppl` = exp(-mean over items of the continuation's summed log-likelihood), the
harness's per-word perplexity. Long contexts are cut on the left (`truncated` counts them).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from jaxrl.data.sources import DataError, jsonl_rows
from jaxrl.eval.lm_model import LanguageModel, score_sequences
from jaxrl.eval.zeroshot import encode_pair, fit_row


def sliding_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) for a stream of n tokens: row stream[begin:end], its last `scored` targets."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride={stride} must be in [1, window={window}].")
    spans, done, begin = [], 1, 0
    while done < n:
        end = min(begin + window + 1, n)
        spans.append((begin, end, end - done))
        done, begin = end, begin + stride
    return spans


def perplexity(lm: LanguageModel, tokens: np.ndarray, *, text: str, window: int = 0, stride: int = 0,
               batch_size: int = 8) -> dict:
    """Sliding-window perplexity of `tokens` (starting with EOT); `text` is what they encode."""
    window = min(window or lm.max_length, lm.max_length)
    stride = stride or window // 2 or 1
    if len(tokens) < 2:
        raise DataError("perplexity needs at least one token after the first.")
    spans = sliding_windows(len(tokens), window, min(stride, window))
    scores = score_sequences(lm, [tokens[b:e] for b, e, _ in spans], batch_size)
    nll = np.concatenate([-s.logprobs[-k:] for s, (_, _, k) in zip(scores, spans)])
    # context length of each scored target: its position inside its window
    context = np.concatenate([np.arange(e - b - k, e - b) for b, e, k in spans])
    total = float(nll.sum())
    words, nbytes = max(len(text.split()), 1), max(len(text.encode("utf-8")), 1)
    edges = [0, *[2**i for i in range(4, int(math.log2(window)) + 1)], window + 1]
    by_context = [{"context_from": lo, "context_to": hi - 1, "tokens": int(m.sum()),
                   "nll": float(nll[m].mean())}
                  for lo, hi in zip(edges[:-1], edges[1:]) if (m := (context >= lo) & (context < hi)).any()]
    return {"tokens": len(nll), "window": window, "stride": stride, "nll": total / len(nll),
            "ppl": math.exp(total / len(nll)), "word_ppl": math.exp(total / words),
            "bits_per_byte": total / nbytes / math.log(2), "by_context": by_context}


def load_stream(path, tokenizer, *, split: str = "val", max_tokens: int = 0) -> tuple[np.ndarray, str]:
    """(EOT + tokens, their text) of a text path (file, dir, glob) or a shard directory's split."""
    from jaxrl.data import shards
    from jaxrl.data.lm import tokenize_documents
    from jaxrl.data.sources import read_documents

    if shards.is_shard_dir(path):
        source = shards.ShardWindowSource(path, split, seq_len=1, pad_id=tokenizer.pad_id)
        n = source.num_tokens if not max_tokens else min(max_tokens, source.num_tokens)
        body = source.read(0, n).astype(np.int32)
    else:
        body = np.concatenate(tokenize_documents(read_documents(path), tokenizer))
        body = body[:max_tokens] if max_tokens else body
    tokens = np.concatenate([[tokenizer.eot_id], body]).astype(np.int32)
    return tokens, tokenizer.decode(body, skip_special_tokens=True)


def load_lambada(path, *, limit: int = 0) -> list[dict]:
    """LAMBADA rows; a malformed one is an error naming the file and line."""
    path, rows = Path(path), []
    for where, row in jsonl_rows(path):
        fields = ("context", "continuation")
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in fields):
            raise DataError(f"{where}: a LAMBADA row needs string fields context and continuation.")
        rows.append({**row, "where": where})
        if limit and len(rows) == limit:
            break
    if not rows:
        raise DataError(f"{path}: no rows.")
    return rows


def lambada(lm: LanguageModel, tokenizer, rows: list[dict], *, batch_size: int = 8) -> dict:
    """Greedy last-word accuracy and per-word perplexity (module docstring)."""
    seqs, spans, truncated = [], [], 0
    for row in rows:
        ctx, cont = encode_pair(tokenizer, row["context"], " " + row["continuation"])
        seq, cut = fit_row(ctx or [tokenizer.eot_id], cont, lm.max_length, row["where"])
        seqs.append(seq)
        spans.append(len(cont))
        truncated += cut
    scores = score_sequences(lm, seqs, batch_size)
    ll = np.array([float(s.logprobs[-k:].sum()) for s, k in zip(scores, spans)])
    hit = np.array([bool(s.greedy[-k:].all()) for s, k in zip(scores, spans)])
    by_tokens = [{"tokens": int(k), "items": int((np.array(spans) == k).sum()),
                  "acc": float(hit[np.array(spans) == k].mean())} for k in sorted(set(spans))]
    return {"items": len(rows), "acc": float(hit.mean()), "ppl": math.exp(-float(ll.mean())),
            "truncated": truncated, "by_tokens": by_tokens,
            "per_item": [{"where": r["where"], "loglikelihood": float(x), "correct": bool(h)}
                         for r, x, h in zip(rows, ll, hit)]}
