"""A text environment: a prompt dataset and a host-side reward on (prompt, completion).

An episode is one completion: `prompt_batch(index, n)` hands out left-padded prompt tokens,
the policy generates on device, and `score(...)` decodes the completions and rewards them on
the host in one batched call. Prompt batches are a pure function of (seed, index), so a
resumed run that knows its step sees exactly the prompts it would have seen, with no
iterator state to checkpoint. Prompt lists come from `jaxrl.data.sources.load_prompts`
(a file of prompts, or the first tokens of each corpus document).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from jaxrl.envs.text.rewards import Completions, RewardFn


class TextTokenizer(Protocol):
    eot_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids) -> str: ...


class WordTokenizer:
    """Whitespace-split words over a fixed vocabulary, plus end-of-text and pad ids.

    For toy tasks and tests: a tiny model over a few dozen words finds a sentiment reward in
    seconds, where GPT-2's 50k-token vocabulary would hide it.
    """

    def __init__(self, words: Sequence[str]):
        self.words = list(words)
        self._ids = {w: i for i, w in enumerate(self.words)}
        if len(self._ids) != len(self.words):
            raise ValueError("WordTokenizer: the vocabulary has repeated words.")
        self.eot_id = len(self.words)
        self.pad_id = len(self.words) + 1
        self.vocab_size = len(self.words) + 2

    def encode(self, text: str) -> list[int]:
        unknown = [w for w in text.split() if w not in self._ids]
        if unknown:
            raise ValueError(f"WordTokenizer: {unknown[:3]} not in the vocabulary.")
        return [self._ids[w] for w in text.split()]

    def decode(self, ids) -> str:
        return " ".join(self.words[i] if i < self.eot_id else "<|endoftext|>"
                        for i in map(int, ids) if i != self.pad_id)


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    texts: list[str]
    tokens: np.ndarray  # [B, P] int32, left-padded with pad_id so every prompt ends at column P-1
    mask: np.ndarray  # [B, P] int32, 1 on real prompt tokens


class TextEnv:
    """Prompts in, completions out, rewards computed on the host in batches."""

    def __init__(self, prompts: Sequence[str], tokenizer: TextTokenizer, reward_fn: RewardFn, *,
                 max_prompt_tokens: int, seed: int = 0):
        if not prompts:
            raise ValueError("TextEnv needs at least one prompt; the prompt source was empty.")
        self.prompts = list(prompts)
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.max_prompt_tokens = max_prompt_tokens
        self.seed = seed
        # Keep the *last* tokens of a long prompt: they are the context the completion continues.
        self._prompt_ids = [tokenizer.encode(p)[-max_prompt_tokens:] for p in self.prompts]
        empty = [p for p, ids in zip(self.prompts, self._prompt_ids) if not ids]
        if empty:
            raise ValueError(f"{len(empty)} prompt(s) encode to no tokens, e.g. {empty[0]!r}; "
                             "drop empty lines from the prompt source.")

    def prompt_batch(self, index: int, num_prompts: int) -> PromptBatch:
        """Batch number `index`: the next `num_prompts` prompts of a reshuffled-per-epoch order."""
        start = index * num_prompts
        positions = np.arange(start, start + num_prompts)
        epochs, offsets = np.divmod(positions, len(self.prompts))
        order = {e: np.random.default_rng((self.seed, int(e))).permutation(len(self.prompts))
                 for e in np.unique(epochs)}
        chosen = [int(order[e][o]) for e, o in zip(epochs, offsets)]
        tokens = np.full((num_prompts, self.max_prompt_tokens), self.tokenizer.pad_id, np.int32)
        mask = np.zeros((num_prompts, self.max_prompt_tokens), np.int32)
        for row, i in enumerate(chosen):
            ids = self._prompt_ids[i]
            tokens[row, -len(ids):] = ids
            mask[row, -len(ids):] = 1
        return PromptBatch([self.prompts[i] for i in chosen], tokens, mask)

    def completions(self, prompts: Sequence[str], response_tokens: np.ndarray,
                    response_mask: np.ndarray) -> Completions:
        """Decode generated tokens (rows of [B, N], 1 in the mask on generated tokens)."""
        response_tokens, response_mask = np.asarray(response_tokens), np.asarray(response_mask, bool)
        texts, finished = [], []
        for row, keep in zip(response_tokens, response_mask):
            ids = [int(t) for t in row[keep]]
            ended = bool(ids) and ids[-1] == self.tokenizer.eot_id
            texts.append(self.tokenizer.decode(ids[:-1] if ended else ids))
            finished.append(ended)
        return Completions(list(prompts), texts, response_mask.sum(-1), np.array(finished, bool))

    def score(self, batch: Completions) -> dict[str, np.ndarray]:
        """Reward components and total (`"reward"`), float32 [B] each."""
        rewards = {k: np.asarray(v, np.float32) for k, v in self.reward_fn(batch).items()}
        if "reward" not in rewards:
            raise ValueError(f"reward function returned {sorted(rewards)}; it must include the "
                             "total under 'reward'.")
        return rewards

