"""REINFORCE: baselines on hand-computed examples, response masks, the KL penalty, and a tiny
GPT-2 whose mean sentiment reward rises under training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrl.algorithms.reinforce import (
    BaselineState,
    CollapseGuard,
    ReinforceConfig,
    Rollout,
    compute_advantages,
    init_state,
    make_train_step,
    policy_gradient_loss,
    update,
)
from jaxrl.core.config import ConfigError
from jaxrl.envs.text import LengthPenaltyConfig, SentimentReward, TextEnv, WordTokenizer
from jaxrl.models.generate import token_logprobs
from jaxrl.models.gpt2 import GPT2, GPT2Config

WORDS = ("good great love happy wonderful nice bad hate sad terrible awful ugly "
         "the a cat dog sat ran and it is day").split()
PROMPTS = ["the cat", "a dog", "it is", "the day is", "the dog ran and", "a cat sat", "it ran", "the cat is"]


def advantages(rewards, **cfg):
    cfg = ReinforceConfig(**cfg)
    adv, values, _ = compute_advantages(jnp.asarray(rewards, jnp.float32), BaselineState.zero(), cfg)
    return np.asarray(adv), np.asarray(values)


def test_leave_one_out_baseline_by_hand():
    # Group 1: r = 1, 2, 3, 6 -> b_i = mean of the other three = 11/3, 10/3, 3, 2.
    # Group 2: r = 0, 0, 0, 4 -> b = 4/3, 4/3, 4/3, 0.
    adv, values = advantages([1, 2, 3, 6, 0, 0, 0, 4], baseline="leave_one_out", group_size=4)
    np.testing.assert_allclose(values, [11 / 3, 10 / 3, 3, 2, 4 / 3, 4 / 3, 4 / 3, 0], rtol=1e-6)
    np.testing.assert_allclose(adv, [-8 / 3, -4 / 3, 0, 4, -4 / 3, -4 / 3, -4 / 3, 4], rtol=1e-6)
    # RLOO's advantage is G/(G-1) times the group-mean one.
    group_adv, _ = advantages([1, 2, 3, 6, 0, 0, 0, 4], baseline="group_mean", group_size=4)
    np.testing.assert_allclose(adv, group_adv * 4 / 3, rtol=1e-6)


def test_grpo_group_normalisation_and_batch_baselines():
    r = np.array([1.0, 3.0, 10.0, 10.0, 0.0, 4.0])
    adv, _ = advantages(r, baseline="group_mean", normalize="group", group_size=2)
    np.testing.assert_allclose(adv, [-1, 1, 0, 0, -1, 1], atol=1e-4)  # equal rewards -> 0, not NaN
    adv, values = advantages(r, baseline="batch_mean", group_size=2)
    np.testing.assert_allclose(values, np.full(6, r.mean()), rtol=1e-6)
    adv, _ = advantages(r, baseline="batch_mean", normalize="batch", group_size=2)
    np.testing.assert_allclose(adv, (r - r.mean()) / r.std(), rtol=1e-4)
    adv, values = advantages(r, baseline="none", group_size=2)
    np.testing.assert_allclose(adv, r) and np.testing.assert_allclose(values, 0)


def test_moving_average_baseline_carries_across_steps():
    cfg = ReinforceConfig(baseline="moving_average", moving_average_decay=0.5, group_size=2)
    state = BaselineState.zero()
    adv, values, state = compute_advantages(jnp.array([1.0, 3.0]), state, cfg)
    np.testing.assert_allclose(values, [2.0, 2.0])  # first batch: its own mean
    assert float(state.value) == 2.0 and int(state.count) == 1
    adv, values, state = compute_advantages(jnp.array([6.0, 6.0]), state, cfg)
    np.testing.assert_allclose(values, [2.0, 2.0])  # the past, not this batch
    np.testing.assert_allclose(adv, [4.0, 4.0])
    assert float(state.value) == pytest.approx(0.5 * 2.0 + 0.5 * 6.0) and int(state.count) == 2


@pytest.mark.parametrize("bad", [dict(baseline="leave_one_out", group_size=1),
                                 dict(normalize="group", baseline="batch_mean", group_size=1),
                                 dict(moving_average_decay=1.0), dict(kl_coef=-0.1)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError, match="reinforce"):
        ReinforceConfig(**bad).validate()


def test_loss_ignores_everything_outside_the_response_mask():
    logprobs = jnp.array([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.5, -0.5, -0.5]])
    response = jnp.array([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    adv = jnp.array([2.0, -1.0])
    loss = policy_gradient_loss(logprobs, response, adv)
    assert float(loss) == pytest.approx(-(2.0 * -5.0 + -1.0 * -1.0) / 2)
    grad = jax.grad(policy_gradient_loss)(logprobs, response, adv)
    np.testing.assert_allclose(grad, -adv[:, None] * response / 2)  # zero off the mask


def tiny_model(tokenizer, seed=0):
    cfg = GPT2Config(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, n_positions=16,
                     n_embd=64, n_layer=2, n_head=2)
    return GPT2(cfg, rngs=nnx.Rngs(seed))


def test_update_adds_the_kl_penalty_to_the_reference_and_reports_components():
    tokenizer = WordTokenizer(WORDS)
    state = init_state(tiny_model(tokenizer, seed=0), optax.sgd(0.0))
    graphdef, params = state.graphdef, state.params
    ref_params = nnx.state(tiny_model(tokenizer, seed=1), nnx.Param)
    pad, eot = tokenizer.pad_id, tokenizer.eot_id
    tokens = jnp.array([[pad, 12, 13, 0, 1, eot], [12, 14, 15, 6, pad, pad]], jnp.int32)
    mask = (tokens != pad).astype(jnp.int32)
    response = jnp.array([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0]], jnp.int32)
    ref = token_logprobs(graphdef, ref_params, tokens, mask) * response
    rollout = Rollout(tokens, mask, response, ref, rewards={
        "sentiment": jnp.array([0.8, -0.5]), "length_penalty": jnp.array([0.0, -0.1]),
        "reward": jnp.array([0.8, -0.6])})
    cfg = ReinforceConfig(kl_coef=0.1, group_size=2, baseline="batch_mean")
    _, metrics = jax.jit(lambda s, r: update(s, r, jax.random.key(0), cfg=cfg))(state, rollout)
    policy = token_logprobs(graphdef, params, tokens, mask)
    kl = np.asarray(((policy - ref) * response).sum(-1))
    assert float(metrics["kl"]) == pytest.approx(kl.mean(), rel=1e-5) and abs(kl.mean()) > 0.01
    assert float(metrics["reward/kl_penalty"]) == pytest.approx(-0.1 * kl.mean(), rel=1e-5)
    assert float(metrics["reward"]) == pytest.approx(0.1 - 0.1 * kl.mean(), rel=1e-5)
    assert float(metrics["reward/sentiment"]) == pytest.approx(0.15)
    assert float(metrics["reward/length_penalty"]) == pytest.approx(-0.05)
    assert float(metrics["response_length"]) == pytest.approx(2.0)
    entropy = -float((policy * response).sum() / response.sum())
    assert float(metrics["entropy"]) == pytest.approx(entropy, rel=1e-5)


def test_collapse_guard_warns_once_per_excursion():
    logged = []
    guard = CollapseGuard(ReinforceConfig(entropy_floor=0.5, kl_ceiling=2.0), log=logged.append)
    assert guard.check(1, entropy=1.0, kl=0.1) == []
    assert len(guard.check(2, entropy=0.2, kl=3.0)) == 2
    assert guard.check(3, entropy=0.1, kl=3.0) == []  # still out of bounds: no repeat
    assert guard.check(4, entropy=0.52, kl=1.9) == []  # back in, but within the margin:
    assert guard.check(5, entropy=0.45, kl=2.1) == []  # hovering at the bound stays quiet
    assert guard.check(6, entropy=1.0, kl=0.1) == []  # clearly back: re-armed
    assert "entropy 0.300" in guard.check(7, entropy=0.3, kl=0.1)[0]
    assert len(logged) == 3


@pytest.mark.parametrize("baseline,normalize", [("leave_one_out", "none"),
                                                ("moving_average", "none"),
                                                ("group_mean", "group")])  # the last is GRPO
def test_tiny_gpt2_learns_to_be_positive(baseline, normalize):
    """A random-init 2-layer GPT-2 over 24 words samples near-uniformly, so VADER sentiment
    starts near 0; REINFORCE with a KL penalty must push the mean sentiment clearly up."""
    tokenizer = WordTokenizer(WORDS)
    reward = SentimentReward(LengthPenaltyConfig(min_tokens=4, max_tokens=8, per_token=0.1))
    env = TextEnv(PROMPTS, tokenizer, reward, max_prompt_tokens=4, seed=0)
    cfg = ReinforceConfig(prompts_per_step=8, group_size=4, max_new_tokens=8, kl_coef=0.01,
                          baseline=baseline, normalize=normalize)
    state = init_state(tiny_model(tokenizer), optax.adam(3e-3))
    ref_params = jax.tree.map(jnp.copy, state.params)  # the step donates state.params
    update_fn = jax.jit(functools.partial(update, cfg=cfg), donate_argnums=0)
    step, collector = make_train_step(env, state.graphdef, cfg, ref_params=ref_params,
                                      update_fn=update_fn,
                                      guard=CollapseGuard(cfg, log=lambda _: None))
    history = []
    for i in range(20):
        state, metrics = step(state, None, jax.random.fold_in(jax.random.key(0), i))
        history.append(jax.device_get(metrics))
    sentiment = [float(m["reward/sentiment"]) for m in history]
    assert abs(sentiment[0]) < 0.3, sentiment
    assert np.mean(sentiment[-5:]) > sentiment[0] + 0.4, sentiment
    assert float(history[-1]["kl"]) > float(history[0]["kl"])  # it moved away from the reference
    assert int(state.step) == 20 and int(state.extra["baseline"].count) == 20
    samples = collector.last_samples.rows(4)
    assert len(samples) == 4 and {"prompt", "completion", "sentiment", "reward"} <= set(samples[0])


def test_recipe_without_a_checkpoint_names_the_sft_command(tmp_path, capsys):
    from jaxrl import launch

    code = launch.main(["configs/reinforce_sentiment.yaml", f"run.dir={tmp_path}",
                        f"init_from={tmp_path / 'missing'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "missing") in err and "configs/sft_gpt2_shakespeare.yaml" in err


def test_recipe_logs_every_component_and_resumes(tmp_path, shared_data):
    """The launch path on 8 fake devices: a random tiny GPT-2 in HF layout stands in for the
    SFT export; two steps, then a resumed third."""
    import json

    from jaxrl import launch
    from jaxrl.models.gpt2 import save_pretrained

    save_pretrained(GPT2(GPT2Config(n_positions=32, n_embd=32, n_layer=1, n_head=2),
                         rngs=nnx.Rngs(0)), tmp_path / "sft")
    run_dir = tmp_path / "run"
    args = ["configs/reinforce_sentiment.yaml", f"run.dir={run_dir}", f"init_from={tmp_path / 'sft'}",
            "prompts.prefix_tokens=4", "prompts.limit=64", "prompts.eval_prompts=8",
            "reinforce.prompts_per_step=4", "reinforce.group_size=2", "reinforce.max_new_tokens=6",
            "loop.log_every=1", "loop.eval_every=2", "loop.checkpoint_every=2", "loop.progress=false"]
    assert launch.main([*args, "loop.steps=2"]) == 0
    assert launch.main([*args, "loop.steps=3"]) == 0  # resumes from the step-2 checkpoint

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for key in ("reward", "reward/sentiment", "reward/length_penalty", "reward/kl_penalty", "kl",
                "entropy", "response_length", "baseline"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    evals = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 3]  # before training, then each eval; no re-run of 0
    assert len(evals[0]["samples"]) == 4 and "eval/sentiment" in evals[0]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 3 and (run_dir / "hf" / "model.safetensors").is_file()
