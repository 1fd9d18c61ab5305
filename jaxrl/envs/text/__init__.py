"""Text environments: prompts in, completions out, rewards on the host (see `env.py`)."""

from jaxrl.envs.text.env import PromptBatch, TextEnv, TextTokenizer, WordTokenizer
from jaxrl.envs.text.rewards import (
    Completions,
    LengthPenaltyConfig,
    RewardFn,
    SentimentReward,
    VaderSentiment,
    length_penalty,
)

__all__ = [
    "Completions",
    "LengthPenaltyConfig",
    "PromptBatch",
    "RewardFn",
    "SentimentReward",
    "TextEnv",
    "TextTokenizer",
    "VaderSentiment",
    "WordTokenizer",
    "length_penalty",
]
