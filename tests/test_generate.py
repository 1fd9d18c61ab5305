"""Generation: HF greedy parity, EOS stopping, masks/logprobs contract, sampling filters, log-probs
under the sampling distribution, the f32 head, and position overflow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl.models.generate import (
    _filter_logits,
    _gather_logprobs,
    generate,
    sample_token,
    sampling_logits,
    token_logprobs,
)
from jaxrl.models.gpt2 import GPT2, GPT2Config, from_pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_VOCAB = 50257
PAD = HF_VOCAB
NEW = 8


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=HF_VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2, attn_implementation="eager",
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def split_model(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_gpt2")
    hf_model.save_pretrained(path)
    return nnx.split(from_pretrained(path))


@pytest.fixture(scope="module")
def prompts():
    """Three left-padded prompts of lengths 6, 4 and 1."""
    rng = np.random.default_rng(0)
    mask = np.array([[1] * 6, [0, 0, 1, 1, 1, 1], [0] * 5 + [1]], np.int32)
    tokens = np.where(mask == 1, rng.integers(0, 1000, mask.shape), PAD).astype(np.int32)
    return tokens, mask


def greedy(split_model, tokens, mask, **kw):
    graphdef, params = split_model
    kw = {"max_new_tokens": NEW, "temperature": 0.0, "eos_id": -1, "pad_id": PAD, **kw}
    return generate(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0), **kw)


def test_greedy_matches_hugging_face(split_model, hf_model, prompts):
    tokens, mask = prompts
    out = greedy(split_model, tokens, mask)
    with torch.no_grad():
        expected = hf_model.generate(
            torch.tensor(np.where(mask == 1, tokens, 0), dtype=torch.long), attention_mask=torch.tensor(mask),
            max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, tokens.shape[1] :], expected.numpy()[:, tokens.shape[1] :])


def test_masks_and_logprobs_follow_the_contract(split_model, prompts):
    tokens, mask = prompts
    out = greedy(split_model, tokens, mask)
    P = tokens.shape[1]
    assert out.tokens.shape == out.mask.shape == out.response_mask.shape == out.logprobs.shape == (3, P + NEW)
    np.testing.assert_array_equal(out.tokens[:, :P], tokens)
    np.testing.assert_array_equal(out.mask, np.concatenate([mask, np.ones((3, NEW), np.int32)], axis=1))
    np.testing.assert_array_equal(out.response_mask[:, P:], 1)
    np.testing.assert_array_equal(out.response_mask[:, :P], 0)
    # Cached decoding scores tokens as the training forward pass does.
    expected = token_logprobs(*split_model, out.tokens, out.mask) * out.response_mask
    np.testing.assert_allclose(out.logprobs, expected, atol=1e-5)
    assert np.all(np.asarray(out.logprobs)[:, P:] < 0)


def test_left_padding_does_not_change_the_continuation(split_model, prompts):
    tokens, mask = prompts
    out = greedy(split_model, tokens, mask)
    alone = greedy(split_model, tokens[1:2, 2:], mask[1:2, 2:])  # row 1 without its padding
    np.testing.assert_array_equal(alone.tokens[0, 4:], out.tokens[1, 6:])


def test_rows_stop_at_eos_and_pad_afterwards(split_model, prompts):
    tokens, mask = prompts
    P = tokens.shape[1]
    free = np.asarray(greedy(split_model, tokens, mask).tokens)
    eos = int(next(t for t in free[0, P:] if t != free[0, P]))  # row 0 emits it mid-way
    out = greedy(split_model, tokens, mask, eos_id=eos)
    for row in range(3):
        hits = np.flatnonzero(free[row, P:] == eos)
        stop = hits[0] + 1 if hits.size else NEW  # tokens kept, EOS included
        np.testing.assert_array_equal(out.tokens[row, P : P + stop], free[row, P : P + stop])
        np.testing.assert_array_equal(out.tokens[row, P + stop :], PAD)
        np.testing.assert_array_equal(out.response_mask[row, P:], np.arange(NEW) < stop)
        np.testing.assert_array_equal(out.mask[row, P:], np.arange(NEW) < stop)
        assert np.all(np.asarray(out.logprobs)[row, P + stop :] == 0)
    lengths = np.asarray(out.response_mask).sum(axis=1)
    assert 1 < lengths[0] < NEW and lengths.max() == NEW  # row 0 stopped early, another did not


def test_top_k_one_and_tiny_top_p_are_greedy(split_model, prompts):
    tokens, mask = prompts
    expected = greedy(split_model, tokens, mask).tokens
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        sampled = greedy(split_model, tokens, mask, temperature=1.0, **kw)
        np.testing.assert_array_equal(sampled.tokens, expected)


def test_filters_keep_the_right_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: np.asarray(_filter_logits(logits, **kw) > -1e30)[0].tolist()  # noqa: E731
    assert kept(top_k=2, top_p=1.0) == [True, True, False, False]
    assert kept(top_k=0, top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7, 0.8 >= 0.7
    assert kept(top_k=0, top_p=0.5) == [True, False, False, False]
    assert kept(top_k=0, top_p=0.81) == [True, True, True, False]


def test_sampling_follows_the_tempered_distribution():
    logits = jnp.log(jnp.array([0.6, 0.3, 0.1]))[None].repeat(20_000, axis=0)
    for temperature, top_k in [(1.0, 0), (0.5, 0), (1.0, 2)]:
        tokens = sample_token(logits, jax.random.key(1), temperature=temperature, top_k=top_k, top_p=1.0)
        probs = jax.nn.softmax(_filter_logits(logits[:1] / temperature, top_k, 1.0))[0]
        np.testing.assert_allclose(np.bincount(tokens, minlength=3) / len(tokens), probs, atol=0.015)


def test_sampled_logprobs_are_the_sampling_distributions(split_model, prompts):
    tokens, mask = prompts
    out = greedy(split_model, tokens, mask, temperature=0.7, top_k=50)
    expected = token_logprobs(*split_model, out.tokens, out.mask, temperature=0.7, top_k=50)
    np.testing.assert_allclose(out.logprobs, expected * out.response_mask, atol=1e-5)
    untempered = token_logprobs(*split_model, out.tokens, out.mask) * out.response_mask
    assert np.abs(np.asarray(untempered - out.logprobs)).max() > 0.1


def test_sampling_logits_temper_then_filter_by_hand():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2))
    # Temperature 1/2 squares the probabilities: 0.25, 0.09, ...; top-2 renormalises those two.
    scored = sampling_logits(logits, temperature=0.5, top_k=2, top_p=1.0)
    picked = _gather_logprobs(scored, jnp.array([0, 1]))
    np.testing.assert_allclose(picked, np.log([0.25 / 0.34, 0.09 / 0.34]), rtol=1e-5)


def test_positions_past_n_positions_are_refused(split_model, prompts):
    tokens, mask = prompts  # 6 columns; the model has 64 positions
    with pytest.raises(ValueError, match=r"prompt \(6\) \+ max_new_tokens \(59\) is 65 tokens wide.*n_positions=64"):
        greedy(split_model, tokens, mask, max_new_tokens=59)
    wide = jnp.zeros((1, 65), jnp.int32)
    with pytest.raises(ValueError, match="65 tokens wide, past the model's n_positions=64"):
        token_logprobs(*split_model, wide, jnp.ones_like(wide))


def test_the_head_and_log_softmax_run_in_float32_under_bfloat16_compute():
    cfg = GPT2Config(vocab_size=64, pad_id=63, n_positions=8, n_embd=32, n_layer=1, n_head=2,
                     dtype="bfloat16")
    graphdef, params = nnx.split(GPT2(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    logits, logprobs = jax.jit(lambda p: (
        nnx.merge(graphdef, p)(tokens)[..., :62],
        token_logprobs(graphdef, p, tokens, jnp.ones_like(tokens))))(params)
    assert logits.dtype == jnp.float32
    rounded = logits.astype(jnp.bfloat16).astype(jnp.float32)
    assert float(jnp.mean(logits == rounded)) < 0.1  # bf16 logits would all round-trip
    assert logprobs.dtype == jnp.float32
    assert float(jnp.mean(logprobs == logprobs.astype(jnp.bfloat16).astype(jnp.float32))) < 0.2
