"""Needle in a haystack: can the model read back a fact planted at some depth of a long context?

A prompt of exactly `length` tokens is: filler sentences (the pass-key task's "The grass is
green. The sky is blue. ..." of Mohtashami & Jaggi, 2023), with the needle sentence inserted
at a sentence boundary at fraction `depth` of the filler (0 = first, 1 = last), then the
question, then the answer. Two needles:

    passkey  "The pass key is 71432. Remember it. 71432 is the pass key." -> " 71432"
    number   "The special magic number is 4816302." -> " 4816302" (RULER's needle)

Values are drawn from a seeded generator, so a grid is reproducible. A cell is correct when
every answer token is the model's argmax given the true prefix (what greedy decoding of the
answer would produce), scored in one forward pass per batch like every other evaluation.
The grid's accuracy is the fraction of `samples` correct per (needle, length, depth).

A small model gets every cell wrong, so the grid also reports how much the needle helps:
`answer_nll` is the answer's mean per-token NLL (nats) in the prompt, `gain` is that NLL in
the same prompt without the needle (filler in its place, same length) minus `answer_nll`.
A model that reads the needle back has gain > 0; one that ignores it, gain 0.
"""

from __future__ import annotations

import numpy as np

from jaxrl.eval.lm_model import LanguageModel, score_sequences

FILLER = (" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.",
          " There and back again.")
NEEDLES = {
    "passkey": (" The pass key is {v}. Remember it. {v} is the pass key.",
                " What is the pass key? The pass key is", 5),
    "number": (" The special magic number is {v}.",
               " What is the special magic number? The special magic number is", 7),
}


def niah_prompt(tokenizer, kind: str, value: str, length: int, depth: float,
                needle: bool = True) -> tuple[list[int], int]:
    """(tokens of a `length`-token prompt ending in the answer, number of answer tokens).

    `needle=False`: the control prompt, filler where the needle would be."""
    template, question, _ = NEEDLES[kind]
    needle_ids = tokenizer.encode(template.format(v=value))
    tail = tokenizer.encode(question) + (answer := tokenizer.encode(" " + value))
    sentences = [tokenizer.encode(s) for s in FILLER]
    room = length - len(needle_ids) - len(tail)
    if room < 1:
        raise ValueError(f"length={length} leaves no room for filler around the {kind} needle.")
    filler, cuts, i = [], [0], 0
    while len(filler) < room:
        filler += sentences[i % len(sentences)]
        cuts.append(len(filler))
        i += 1
    filler = filler[:room]
    cuts = [c for c in cuts if c < room] + [room]  # sentence ends, and the end of the filler
    at = min(cuts, key=lambda c: abs(c - depth * room))
    if not needle:
        return filler + _filler(sentences, len(needle_ids)) + tail, len(answer)
    return filler[:at] + needle_ids + filler[at:] + tail, len(answer)


def _filler(sentences: list[list[int]], n: int) -> list[int]:
    out, i = [], 0
    while len(out) < n:
        out += sentences[i % len(sentences)]
        i += 1
    return out[:n]


def niah_grid(lm: LanguageModel, tokenizer, *, lengths: list[int], depths: list[float],
              kinds: list[str], samples: int = 4, seed: int = 0, batch_size: int = 8) -> dict:
    """Accuracy per (kind, length, depth); lengths above the model's context are skipped."""
    rng = np.random.default_rng(seed)
    fits = [n for n in lengths if n <= lm.max_length + 1]
    cells, rows, spans = [], [], []
    for kind in kinds:
        digits = NEEDLES[kind][2]
        for n in fits:
            for d in depths:
                for _ in range(samples):
                    value = str(rng.integers(10 ** (digits - 1), 10**digits))
                    for with_needle in (True, False):
                        row, k = niah_prompt(tokenizer, kind, value, n, d, needle=with_needle)
                        cells.append((kind, n, d, with_needle))
                        rows.append(row)
                        spans.append(k)
    scores = score_sequences(lm, rows, batch_size)
    hits, nll = {}, {}
    for cell, s, k in zip(cells, scores, spans):
        nll.setdefault(cell, []).append(-float(s.logprobs[-k:].mean()))
        if cell[3]:
            hits.setdefault(cell[:3], []).append(bool(s.greedy[-k:].all()))

    def grid(value):  # (kind, n, d) -> number  =>  {kind: {n: {d: number}}}
        return {kind: {str(n): {str(d): value(kind, n, d) for d in depths} for n in fits} for kind in kinds}

    def mean(g):
        return {kind: float(np.mean([v for row in g[kind].values() for v in row.values()])) for kind in kinds}

    accuracy = grid(lambda *c: float(np.mean(hits[c])))
    answer_nll = grid(lambda *c: float(np.mean(nll[(*c, True)])))
    gain = grid(lambda *c: float(np.mean(nll[(*c, False)]) - np.mean(nll[(*c, True)])))
    return {"lengths": fits, "skipped_lengths": [n for n in lengths if n not in fits], "depths": depths,
            "samples": samples, "accuracy": accuracy, "mean": mean(accuracy), "answer_nll": answer_nll,
            "gain": gain, "mean_gain": mean(gain)}
