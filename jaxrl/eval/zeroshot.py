"""Zero-shot multiple choice by log-likelihood (PIQA, HellaSwag, WinoGrande, ARC, BoolQ, ...).

Item formats (JSONL, one object per line):

    {"query", "choices", "gold"}               the llm-foundry format of ../shared/data/zeroshot
    {"context_options", "continuation", "gold"} WinoGrande's partial scoring: the options differ
                                               in the context, all share the continuation
    {"ctx", "endings", "expected_index"}       HellaSwag (hellaswag_subset/); the context is
                                               "<activity_label>: <ctx>" when a label is given

The scoring rule, exactly (it is lm-eval-harness's `loglikelihood` with its `acc` and `acc_norm`):

1. Each choice i is a pair (context_i, continuation_i): for the first and third formats
   context = query + delimiter and continuation = choice; for WinoGrande context = option +
   delimiter and continuation = the shared continuation. The delimiter is " " unless the set
   names another (`zeroshot.delimiters` in configs/eval_lm.yaml, e.g. "\nAnswer: "), so a
   delimiter's words are context, never scored.
2. Trailing whitespace of the context moves to the start of the continuation. Then
   whole = encode(context + continuation), ctx = encode(context), and the continuation's
   tokens are whole[len(ctx):] (so BPE merges across the seam count as continuation).
3. ll_i = sum of log p(token | everything before it) over the continuation tokens. When
   context + continuation exceeds the model's context (max_length + 1 tokens, the last token
   is only a target), the context is cut on the left to fit and the item is counted in
   `truncated`; a continuation that alone does not fit is an error.
4. acc: argmax_i ll_i == gold. acc_norm: argmax_i ll_i / chars_i == gold, where chars_i is
   the number of characters of the choice text without the delimiter (for WinoGrande, of the
   shared continuation, so acc_norm = acc there). acc_norm_tokens: argmax of the mean
   log-prob per continuation token (llm-foundry's rule). Ties go to the lowest index.

Every (item, choice) pair is one row of `lm_model.score_sequences`: padded, one forward per
batch, no row scored twice.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxrl.data.sources import DataError, jsonl_rows
from jaxrl.eval.lm_model import LanguageModel, score_sequences


@dataclasses.dataclass(frozen=True)
class Choice:
    context: str
    continuation: str
    chars: int  # characters of the choice text, for acc_norm


@dataclasses.dataclass(frozen=True)
class Item:
    choices: tuple[Choice, ...]
    gold: int
    where: str  # file:line, for error messages


def _parse(row, delimiter: str, where: str) -> Item:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    if "context_options" in row:
        need = ("context_options", "continuation", "gold")
    elif "endings" in row:
        need = ("ctx", "endings", "expected_index")
    else:
        need = ("query", "choices", "gold")
    missing = [k for k in need if k not in row]
    if missing:
        raise DataError(f"{where}: missing {missing} (fields: {', '.join(sorted(row)) or 'none'}). A "
                        "multiple-choice row needs query/choices/gold, context_options/continuation/gold "
                        "(WinoGrande) or ctx/endings/expected_index (HellaSwag).")
    if "context_options" in row:
        options, cont = row["context_options"], row["continuation"]
        if not isinstance(options, list):
            raise DataError(f"{where}: context_options must be a list of strings, got {options!r:.80}.")
        choices = tuple(Choice(str(o) + delimiter, str(cont), len(str(cont))) for o in options)
        gold = row["gold"]
    else:
        if "endings" in row:
            query = f"{row['activity_label']}: {row['ctx']}" if row.get("activity_label") else row["ctx"]
            texts, gold = row["endings"], row["expected_index"]
        else:
            query, texts, gold = row["query"], row["choices"], row["gold"]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise DataError(f"{where}: the choices must be a list of strings, got {texts!r:.80}.")
        choices = tuple(Choice(str(query) + delimiter, t, len(t)) for t in texts)
    if len(choices) < 2:
        raise DataError(f"{where}: needs at least 2 choices, got {len(choices)}.")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise DataError(f"{where}: gold={gold!r} must be an index into the {len(choices)} choices.")
    return Item(choices, gold, where)


def load_items(path: str | Path, *, delimiter: str = " ", limit: int = 0) -> list[Item]:
    """Items of one JSONL file; a malformed row is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such zero-shot file.")
    items = []
    for where, row in jsonl_rows(path):
        items.append(_parse(row, delimiter, where))
        if limit and len(items) == limit:
            break
    if not items:
        raise DataError(f"{path}: no rows.")
    return items


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) by rule 2 of the module docstring."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return whole[: len(ctx)], whole[len(ctx) :]


def fit_row(context: list[int], continuation: list[int], max_length: int, where: str) -> tuple[list[int], bool]:
    """context + continuation cut on the left to max_length + 1 tokens; -> (row, truncated)."""
    if not continuation:
        raise DataError(f"{where}: the continuation encodes to no tokens.")
    if len(continuation) > max_length:
        raise DataError(f"{where}: the continuation alone is {len(continuation)} tokens, more than the "
                        f"model's context of {max_length}.")
    row = context + continuation
    return row[-(max_length + 1) :], len(row) > max_length + 1


def score_choices(lm: LanguageModel, tokenizer, items: list[Item], *, batch_size: int = 8) -> dict:
    """Per-choice log-likelihoods and the three accuracies of the module docstring."""
    rows, spans, truncated = [], [], set()
    for n, item in enumerate(items):
        for choice in item.choices:
            ctx, cont = encode_pair(tokenizer, choice.context, choice.continuation)
            if not ctx:  # nothing to condition on: start from end-of-text, as the harness does
                ctx = [tokenizer.eot_id]
            row, cut = fit_row(ctx, cont, lm.max_length, item.where)
            if cut:
                truncated.add(n)
            rows.append(row)
            spans.append(len(cont))
    scores = score_sequences(lm, rows, batch_size)
    lls = [float(np.sum(s.logprobs[-k:])) for s, k in zip(scores, spans)]
    per_item, at = [], 0
    hits = {"acc": 0, "acc_norm": 0, "acc_norm_tokens": 0}
    for item in items:
        k = len(item.choices)
        ll = np.array(lls[at : at + k])
        ntok = np.array(spans[at : at + k], np.float64)
        chars = np.array([c.chars for c in item.choices], np.float64)
        at += k
        picks = {"acc": int(np.argmax(ll)), "acc_norm": int(np.argmax(ll / np.maximum(chars, 1))),
                 "acc_norm_tokens": int(np.argmax(ll / ntok))}
        for name, pick in picks.items():
            hits[name] += pick == item.gold
        per_item.append({"where": item.where, "gold": item.gold, "loglikelihoods": ll.tolist(),
                         "tokens": ntok.astype(int).tolist(), **{f"pick_{k}": v for k, v in picks.items()}})
    n = len(items)
    return {"items": n, **{name: hits[name] / n for name in hits}, "truncated": len(truncated),
            "per_item": per_item}
