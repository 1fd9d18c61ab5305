"""Host-side rewards on (prompt, completion) batches, each component reported on its own.

A reward function takes a `Completions` batch and returns a dict of per-sample float32 arrays:
one entry per component plus their sum under `"reward"`. Keeping the components separate is
what lets a run show *why* the reward moved (sentiment up, or just length gamed). The KL
penalty to a reference model needs device logprobs, so it is added inside the jitted update
step (`jaxrl.algorithms.reinforce`), not here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from jaxrl.core.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Completions:
    """A scored batch: prompts and completions as text, plus completion length facts."""

    prompts: Sequence[str]
    texts: Sequence[str]  # the completion only, without the prompt or the end-of-text token
    num_tokens: np.ndarray  # [B] int, generated tokens including a final end-of-text
    finished: np.ndarray  # [B] bool, the completion ended with end-of-text before the limit


class RewardFn(Protocol):
    def __call__(self, batch: Completions) -> dict[str, np.ndarray]: ...


class VaderSentiment:
    """VADER compound sentiment of the completion, in [-1, 1] (offline lexicon, ~40 us/text)."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([self._analyzer.polarity_scores(t)["compound"] for t in texts], np.float32)


@dataclasses.dataclass
class LengthPenaltyConfig:
    """Penalty per token outside [min_tokens, max_tokens], so neither a one-word cheer nor an
    endless run-on can win: `-per_token * (max(0, min - n) + max(0, n - max))`, plus a flat
    `unfinished` penalty when the completion hit the generation limit without end-of-text."""

    min_tokens: int = 8
    max_tokens: int = 64
    per_token: float = 0.05
    unfinished: float = 0.0

    def validate(self):
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ConfigError(f"length_penalty: need 0 <= min_tokens <= max_tokens, got "
                              f"min_tokens={self.min_tokens}, max_tokens={self.max_tokens}.")
        if self.per_token < 0 or self.unfinished < 0:
            raise ConfigError("length_penalty: per_token and unfinished are penalty sizes and "
                              f"must be >= 0, got {self.per_token} and {self.unfinished}.")


def length_penalty(num_tokens: np.ndarray, finished: np.ndarray, cfg: LengthPenaltyConfig) -> np.ndarray:
    """The (non-positive) length penalty per completion."""
    n = np.asarray(num_tokens, np.float32)
    outside = np.maximum(0.0, cfg.min_tokens - n) + np.maximum(0.0, n - cfg.max_tokens)
    unfinished = np.where(np.asarray(finished, bool), 0.0, cfg.unfinished)
    return (-cfg.per_token * outside - unfinished).astype(np.float32)


class SentimentReward:
    """`sentiment_weight * VADER(completion) + length_penalty`, with both parts reported."""

    def __init__(self, length: LengthPenaltyConfig, *, sentiment_weight: float = 1.0):
        self.length = length
        self.sentiment_weight = sentiment_weight
        self._vader = VaderSentiment()

    def __call__(self, batch: Completions) -> dict[str, np.ndarray]:
        sentiment = self._vader(batch.texts)
        penalty = length_penalty(batch.num_tokens, batch.finished, self.length)
        return {
            "sentiment": sentiment,
            "length_penalty": penalty,
            "reward": self.sentiment_weight * sentiment + penalty,
        }
