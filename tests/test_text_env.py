"""Text environment: prompt batches, decoding completions, and the sentiment/length reward."""

import numpy as np
import pytest

from jaxrl.data.sources import load_prompts
from jaxrl.data.tokenizer import Tokenizer
from jaxrl.envs.text import (
    Completions,
    LengthPenaltyConfig,
    SentimentReward,
    TextEnv,
    VaderSentiment,
    WordTokenizer,
    length_penalty,
)
from jaxrl.core.config import ConfigError

WORDS = "good great love bad hate the cat dog sat is".split()


def make_env(prompts, *, max_prompt_tokens=3, reward=None, seed=0):
    tokenizer = WordTokenizer(WORDS)
    reward = reward or SentimentReward(LengthPenaltyConfig(min_tokens=2, max_tokens=4, per_token=0.1))
    return TextEnv(prompts, tokenizer, reward, max_prompt_tokens=max_prompt_tokens, seed=seed)


def test_prompt_batch_is_left_padded_and_keeps_the_last_tokens():
    env = make_env(["the cat", "the dog sat is good"])
    batch = env.prompt_batch(0, 2)
    rows = {text: (tokens, mask) for text, tokens, mask in zip(batch.texts, batch.tokens, batch.mask)}
    pad = env.tokenizer.pad_id
    tokens, mask = rows["the cat"]
    assert tokens.tolist() == [pad, WORDS.index("the"), WORDS.index("cat")]
    assert mask.tolist() == [0, 1, 1]
    tokens, mask = rows["the dog sat is good"]  # 5 tokens, last 3 kept
    assert env.tokenizer.decode(tokens) == "sat is good"
    assert mask.tolist() == [1, 1, 1]
    assert batch.tokens.dtype == np.int32 and batch.mask.dtype == np.int32


def test_prompt_batches_cover_each_epoch_once_and_are_reproducible():
    prompts = [f"the {w}" for w in ("cat", "dog", "good", "bad", "love")]
    env = make_env(prompts, seed=3)
    # 5 prompts in batches of 2: batches 0..4 span epochs 0 and 1 (10 positions).
    seen = [t for i in range(5) for t in env.prompt_batch(i, 2).texts]
    assert sorted(seen[:5]) == sorted(prompts) and sorted(seen[5:]) == sorted(prompts)
    assert seen[:5] != seen[5:]  # reshuffled between epochs (fixed seed, so deterministic)
    again = make_env(prompts, seed=3)
    assert again.prompt_batch(3, 2).texts == seen[6:8]  # a pure function of (seed, index)
    assert make_env(prompts, seed=4).prompt_batch(0, 5).texts != seen[:5]


def test_bad_prompts_are_rejected():
    with pytest.raises(ValueError, match="at least one prompt"):
        make_env([])
    with pytest.raises(ValueError, match="encode to no tokens"):
        make_env(["the cat", "   "])


def test_completions_strip_eot_and_report_length_and_finish():
    env = make_env(["the cat"])
    eot, pad = env.tokenizer.eot_id, env.tokenizer.pad_id
    good, great = WORDS.index("good"), WORDS.index("great")
    tokens = np.array([[good, great, eot, pad], [good, good, good, great]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    batch = env.completions(["p", "q"], tokens, mask)
    assert batch.texts == ["good great", "good good good great"]
    assert batch.num_tokens.tolist() == [3, 4]
    assert batch.finished.tolist() == [True, False]


def test_length_penalty_outside_the_window():
    cfg = LengthPenaltyConfig(min_tokens=4, max_tokens=10, per_token=0.1, unfinished=0.5)
    n = np.array([1, 4, 7, 10, 13])
    finished = np.array([True, True, True, True, False])
    np.testing.assert_allclose(length_penalty(n, finished, cfg), [-0.3, 0, 0, 0, -0.3 - 0.5], atol=1e-6)


@pytest.mark.parametrize("bad", [dict(min_tokens=5, max_tokens=4), dict(per_token=-1.0)])
def test_length_penalty_config_validates(bad):
    with pytest.raises(ConfigError, match="length_penalty"):
        LengthPenaltyConfig(**bad).validate()


def test_sentiment_reward_components_add_up_and_rank_texts():
    reward = SentimentReward(LengthPenaltyConfig(min_tokens=3, max_tokens=6, per_token=0.2),
                             sentiment_weight=2.0)
    batch = Completions(prompts=["p"] * 4,
                        texts=["i love this great day", "i hate this awful day", "the cat sat", "great"],
                        num_tokens=np.array([5, 5, 3, 1]), finished=np.ones(4, bool))
    out = reward(batch)
    assert set(out) == {"sentiment", "length_penalty", "reward"}
    assert out["sentiment"][0] > 0.5 and out["sentiment"][1] < -0.5 and out["sentiment"][2] == 0.0
    np.testing.assert_allclose(out["length_penalty"], [0, 0, 0, -0.4], atol=1e-6)
    np.testing.assert_allclose(out["reward"], 2.0 * out["sentiment"] + out["length_penalty"], atol=1e-6)
    # A one-word cheer scores high sentiment but loses to a full positive sentence.
    assert out["sentiment"][3] > 0.5 and out["reward"][3] < out["reward"][0]


def test_score_requires_a_total():
    env = make_env(["the cat"], reward=lambda batch: {"sentiment": VaderSentiment()(batch.texts)})
    batch = env.completions(["the cat"], np.array([[0]]), np.array([[1]]))
    with pytest.raises(ValueError, match="'reward'"):
        env.score(batch)


def test_gpt2_env_on_shakespeare_prompts(shared_data):
    """The real pipeline: corpus prompts (data helper's loader) -> GPT-2 tokens -> env."""
    tokenizer = Tokenizer.gpt2()
    prompts = load_prompts(shared_data / "corpora/tinyshakespeare/input.txt", prefix_tokens=8,
                           tokenizer=tokenizer, limit=50)
    env = TextEnv(prompts, tokenizer, SentimentReward(LengthPenaltyConfig()), max_prompt_tokens=8)
    batch = env.prompt_batch(0, 4)
    assert batch.tokens.shape == (4, 8) and batch.mask[:, -1].all()  # prompts end at the edge
    assert [tokenizer.decode(row) for row in batch.tokens] == batch.texts  # pad drops out
    reply = np.array([tokenizer.encode(" I love thee well") + [tokenizer.eot_id]])
    completions = env.completions(batch.texts[:1], reply, np.ones_like(reply))
    assert completions.texts == [" I love thee well"] and completions.finished.all()
    assert env.score(completions)["sentiment"][0] > 0.5
