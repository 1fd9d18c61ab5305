"""Policy gradient for LMs: advantage estimators, KL estimators, losses and aggregations on
hand-computed numbers; the update trains the distribution that sampled, accumulates
micro-batches exactly and keeps KL out of the advantages; a tiny GPT-2 learns to be positive."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrl.algorithms.policy_gradient import (
    BaselineState,
    PolicyGradientConfig,
    aggregate,
    compute_advantages,
    init_state,
    is_reinforce,
    kl_k1,
    kl_k2,
    kl_k3,
    ppo_clip,
    update,
)
from jaxrl.core.config import ConfigError
from jaxrl.envs.text import LengthPenaltyConfig, SentimentReward, TextEnv, WordTokenizer
from jaxrl.envs.text.collector import (
    CollapseGuard,
    GuardConfig,
    RolloutCollector,
    RolloutConfig,
    make_train_step,
)
from jaxrl.models.generate import Sampling, token_logprobs
from jaxrl.models.gpt2 import GPT2, GPT2Config

WORDS = ("good great love happy wonderful nice bad hate sad terrible awful ugly "
         "the a cat dog sat ran and it is day").split()
PROMPTS = ["the cat", "a dog", "it is", "the day is", "the dog ran and", "a cat sat", "it ran",
           "the cat is"]
TOKENIZER = WordTokenizer(WORDS)


def advantages(rewards, advantage, group_size):
    cfg = PolicyGradientConfig(advantage=advantage)
    adv, values, _ = compute_advantages(jnp.asarray(rewards, jnp.float32), group_size,
                                        BaselineState.zero(), cfg)
    return np.asarray(adv), np.asarray(values)


def test_rloo_and_dr_grpo_by_hand():
    # Group 1: r = 1, 2, 3, 6 -> b_i = mean of the other three = 11/3, 10/3, 3, 2.
    # Group 2: r = 0, 0, 0, 4 -> b = 4/3, 4/3, 4/3, 0.
    r = [1, 2, 3, 6, 0, 0, 0, 4]
    adv, values = advantages(r, "rloo", 4)
    np.testing.assert_allclose(values, [11 / 3, 10 / 3, 3, 2, 4 / 3, 4 / 3, 4 / 3, 0], rtol=1e-6)
    np.testing.assert_allclose(adv, [-8 / 3, -4 / 3, 0, 4, -4 / 3, -4 / 3, -4 / 3, 4], rtol=1e-6)
    # Dr.GRPO: the group mean, no std; RLOO's advantage is G/(G-1) times it.
    dr, _ = advantages(r, "dr_grpo", 4)
    np.testing.assert_allclose(dr, [-2, -1, 0, 3, -1, -1, -1, 3], rtol=1e-6)
    np.testing.assert_allclose(adv, dr * 4 / 3, rtol=1e-6)


def test_grpo_divides_by_the_group_std_and_tied_groups_give_exactly_zero():
    adv, _ = advantages([1.0, 3.0, 10.0, 10.0, 0.0, 4.0], "grpo", 2)
    np.testing.assert_allclose(adv, [-1, 1, 0, 0, -1, 1], rtol=1e-6)
    # Ties up to f32 rounding: 0.1 three times (its f32 mean is off by an ulp), and 5 against
    # the next float32 after it. Dividing the leftover by its own std would give +-1.
    tied = [0.1, 0.1, 0.1, 5.0, 5.0, float(np.nextafter(np.float32(5), np.float32(6)))]
    for name in ("grpo", "rloo", "dr_grpo"):
        adv, _ = advantages(tied, name, 3)
        assert np.all(adv == 0.0), (name, adv)
    adv, _ = advantages([0.0, 1e-3], "grpo", 2)  # a small but real difference still counts
    np.testing.assert_allclose(adv, [-1, 1], rtol=1e-3)


def test_batch_estimators_by_hand():
    r = np.array([1.0, 3.0, 10.0, 10.0, 0.0, 4.0])
    adv, values = advantages(r, "batch_mean", 2)
    np.testing.assert_allclose(values, np.full(6, 14 / 3), rtol=1e-6)
    adv, _ = advantages(r, "batch_norm", 2)
    np.testing.assert_allclose(adv, (r - r.mean()) / r.std(), rtol=1e-5)
    adv, _ = advantages([0.7] * 6, "batch_norm", 2)
    assert np.all(adv == 0.0)
    adv, values = advantages(r, "none", 2)
    np.testing.assert_allclose(adv, r)
    np.testing.assert_allclose(values, 0)


def test_moving_average_baseline_carries_across_steps():
    cfg = PolicyGradientConfig(advantage="moving_average", moving_average_decay=0.5)
    state = BaselineState.zero()
    adv, values, state = compute_advantages(jnp.array([1.0, 3.0]), 2, state, cfg)
    np.testing.assert_allclose(values, [2.0, 2.0])  # first batch: its own mean
    assert float(state.value) == 2.0 and int(state.count) == 1
    adv, values, state = compute_advantages(jnp.array([6.0, 6.0]), 2, state, cfg)
    np.testing.assert_allclose(values, [2.0, 2.0])  # the past, not this batch
    np.testing.assert_allclose(adv, [4.0, 4.0])
    assert float(state.value) == pytest.approx(0.5 * 2.0 + 0.5 * 6.0) and int(state.count) == 2


@pytest.mark.parametrize("bad,match", [
    (dict(temperature=0.0), "temperature=0"),
    (dict(advantage="rloo", group_size=1), "group_size must be >= 2"),
    (dict(advantage="grpo", group_size=1), "group_size must be >= 2"),
    (dict(minibatches=3), "equal slices"),
    (dict(micro_batches=5, minibatches=2), "equal slices"),
])
def test_rollout_settings_the_update_cannot_learn_from_are_rejected(bad, match):
    sampling = {k: bad.pop(k) for k in ("temperature",) if k in bad}
    group_size = bad.pop("group_size", 4)
    cfg = PolicyGradientConfig(**bad)
    with pytest.raises(ConfigError, match=match):
        cfg.check_rollout(batch_size=8 * group_size, group_size=group_size,
                          temperature=sampling.get("temperature", 1.0))


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(micro_batches=0), dict(clip_eps=1.0),
                                 dict(kl_coef=-0.1), dict(moving_average_decay=1.0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError, match="reinforce"):
        PolicyGradientConfig(**bad).validate()


def test_kl_estimators_by_hand():
    logp, ref = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25]))
    # r = pi_ref / pi = 1/2: k1 = log 2, k2 = (log 2)^2 / 2, k3 = r - log r - 1 = log 2 - 1/2.
    assert float(kl_k1(logp, ref)[0]) == pytest.approx(np.log(2), rel=1e-6)
    assert float(kl_k2(logp, ref)[0]) == pytest.approx(np.log(2) ** 2 / 2, rel=1e-6)
    assert float(kl_k3(logp, ref)[0]) == pytest.approx(np.log(2) - 0.5, rel=1e-6)
    # A token the policy's own top-k dropped (log-prob near f32's minimum) has probability 0
    # under it: no KL. A log-ratio of 49 is clamped to 20.
    dropped, ref = jnp.array([jnp.finfo(jnp.float32).min, -50.0]), jnp.array([-1.0, -1.0])
    for estimator in (kl_k1, kl_k2, kl_k3):
        assert float(estimator(dropped, ref)[0]) == 0.0
    assert float(kl_k3(dropped, ref)[1]) == pytest.approx(np.exp(20.0) - 21.0, rel=1e-6)


def test_loss_aggregations_by_hand():
    values = jnp.array([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    expected = {"token-mean": 7 / 3, "seq-mean-token-mean": (1.5 + 4) / 2,
                "seq-mean-token-sum": (3 + 4) / 2, "seq-mean-token-sum-norm": 7 / 6}
    for name, value in expected.items():
        assert float(aggregate(values, mask, name)) == pytest.approx(value, rel=1e-6), name


def test_ppo_clip_by_hand():
    cfg = PolicyGradientConfig(clip_eps=0.2)
    ratio = jnp.array([1.5, 1.5, 0.5, 0.5])
    adv = jnp.array([1.0, -1.0, 1.0, -1.0])
    loss, clipped = ppo_clip(jnp.log(ratio), jnp.zeros(4), adv, cfg)
    # r A vs clip(r) A, the smaller objective wins: 1.2 (clipped), -1.5, 0.5, -0.8 (clipped).
    np.testing.assert_allclose(loss, [-1.2, 1.5, -0.5, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [1, 0, 0, 1])
    grad = jax.grad(lambda lp: ppo_clip(lp, jnp.zeros(4), adv, cfg)[0].sum())(jnp.log(ratio))
    np.testing.assert_allclose(grad, [0.0, 1.5, -0.5, 0.0], rtol=1e-6)  # -r A where unclipped


def test_is_reinforce_on_policy_is_the_reinforce_gradient():
    logp = jnp.array([-1.0, -2.0, -0.5])
    adv = jnp.array([2.0, -1.0, 0.5])
    loss, _ = is_reinforce(logp, logp, adv, PolicyGradientConfig())
    np.testing.assert_allclose(loss, -adv)  # ratio 1
    grad = jax.grad(lambda lp: is_reinforce(lp, logp, adv, PolicyGradientConfig())[0].sum())(logp)
    np.testing.assert_allclose(grad, -adv)


def tiny_model(seed=0, n_layer=2, n_embd=64):
    cfg = GPT2Config(vocab_size=TOKENIZER.vocab_size, pad_id=TOKENIZER.pad_id, n_positions=16,
                     n_embd=n_embd, n_layer=n_layer, n_head=2)
    return GPT2(cfg, rngs=nnx.Rngs(seed))


def sentiment_env():
    reward = SentimentReward(LengthPenaltyConfig(min_tokens=4, max_tokens=8, per_token=0.1))
    return TextEnv(PROMPTS, TOKENIZER, reward, max_prompt_tokens=4, seed=0)


@pytest.fixture(scope="module")
def rollout():
    """16 completions (4 prompts x 4) of a random 1-layer GPT-2 (`small_model`) at
    temperature 0.5, top-k 5, with a reference model of another seed."""
    graphdef, params = nnx.split(small_model(0))
    ref_params = nnx.state(small_model(1), nnx.Param)
    cfg = RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=8,
                        sampling=Sampling(temperature=0.5, top_k=5))
    collector = RolloutCollector(sentiment_env(), graphdef, cfg, n_positions=16,
                                 ref_params=ref_params)
    return collector.collect(params, 0, jax.random.key(0))


small_model = functools.partial(tiny_model, n_layer=1, n_embd=32)


SGD = optax.sgd(1.0)
# One loss for the update tests below, so they share a compiled update: PPO-clip with a tight
# clip, GRPO advantages, a strong per-token KL term, every token weighted the same.
SHARED = PolicyGradientConfig(loss="ppo_clip", clip_eps=0.05, advantage="grpo", kl_coef=0.5,
                              loss_agg="token-mean")
jitted_update = jax.jit(update, static_argnames="cfg")


def run_update(rollout, cfg=SHARED, optimizer=SGD):
    return jitted_update(init_state(small_model(0), optimizer), rollout, jax.random.key(1), cfg=cfg)


def test_the_update_scores_tokens_under_the_sampling_distribution(rollout):
    """PPO's first step compares the policy with the sampler: at the sampling params every
    ratio is 1 (nothing clipped) only if the loss applies the sampler's temperature and top-k."""
    _, metrics = run_update(rollout)
    assert float(metrics["clip_fraction"]) == 0.0 and float(metrics["advantage_std"]) > 0.5
    # Scored untempered and unfiltered (the old, biased loss), most ratios are far from 1.
    untempered = token_logprobs(*nnx.split(small_model(0)), rollout.tokens, rollout.mask)
    ratio = np.exp(np.asarray(untempered - rollout.logprobs))[np.asarray(rollout.response_mask) == 1]
    assert np.mean(np.abs(ratio - 1) > 0.05) > 0.5


def test_kl_is_a_per_token_loss_term_not_part_of_the_advantage(rollout):
    rewards = {name: jnp.full(16, 0.4, jnp.float32) for name in rollout.rewards}  # tied: A = 0
    _, metrics = run_update(dataclasses.replace(rollout, rewards=rewards))
    policy = token_logprobs(*nnx.split(small_model(0)), rollout.tokens, rollout.mask,
                            **rollout.sampling.kwargs())
    kl = float(aggregate(kl_k3(policy, rollout.ref_logprobs), rollout.response_mask, "token-mean"))
    assert float(metrics["advantage_std"]) == 0.0 and float(metrics["pg_loss"]) == 0.0
    assert float(metrics["kl_loss"]) == pytest.approx(kl, rel=1e-4) and kl > 0.01
    assert float(metrics["loss"]) == pytest.approx(0.5 * kl, rel=1e-4)
    assert float(metrics["reward"]) == pytest.approx(0.4)  # the host reward, no KL mixed in
    # The KL measured from the sampler's log-probs: summed per completion, then averaged.
    k1 = ((rollout.logprobs - rollout.ref_logprobs) * rollout.response_mask).sum(-1).mean()
    assert float(metrics["kl"]) == pytest.approx(float(k1), rel=1e-5)


def test_micro_batches_accumulate_the_same_gradient(rollout):
    one, _ = run_update(rollout)
    four, _ = run_update(rollout, dataclasses.replace(SHARED, micro_batches=4))
    before = nnx.state(small_model(0), nnx.Param)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), one.params, before)
    assert max(jax.tree.leaves(moved)) > 1e-3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), one.params, four.params)


def test_evaluation_samples_at_the_eval_temperature():
    """rollout.eval_temperature=0: every evaluation is the greedy completion whatever the key,
    while training keeps sampling at its own temperature."""
    graphdef, params = nnx.split(small_model(0))
    cfg = RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=8,
                        sampling=Sampling(temperature=0.5, top_k=5), eval_temperature=0.0)
    eval_cfg = cfg.for_eval(4)
    assert (eval_cfg.batch_size, eval_cfg.sampling) == (4, Sampling(temperature=0.0, top_k=5))
    collect = lambda c, key: RolloutCollector(  # noqa: E731
        sentiment_env(), graphdef, c, n_positions=16, ref_params=None).collect(params, 0, key).tokens
    greedy = [np.asarray(collect(eval_cfg, jax.random.key(k))) for k in (0, 1)]
    np.testing.assert_array_equal(*greedy)
    at_train_temperature = dataclasses.replace(eval_cfg, sampling=cfg.sampling)
    sampled = [np.asarray(collect(at_train_temperature, jax.random.key(k))) for k in (0, 1)]
    assert (sampled[0] != sampled[1]).any()
    with pytest.raises(ConfigError, match="eval_temperature must be >= 0"):
        RolloutConfig(eval_temperature=-1.0).validate()


def test_collector_refuses_prompts_and_completions_past_n_positions():
    graphdef, _ = nnx.split(small_model(0))
    with pytest.raises(ValueError, match=r"max_prompt_tokens \(4\) \+ rollout.max_new_tokens "
                                         r"\(13\) is 17 tokens wide.*n_positions=16"):
        RolloutCollector(sentiment_env(), graphdef, RolloutConfig(max_new_tokens=13),
                         n_positions=16, ref_params=None)


def test_collapse_guard_warns_once_per_excursion():
    logged = []
    guard = CollapseGuard(GuardConfig(entropy_floor=0.5, kl_ceiling=2.0), log=logged.append)
    assert guard.check(1, entropy=1.0, kl=0.1) == []
    assert len(guard.check(2, entropy=0.2, kl=3.0)) == 2
    assert guard.check(3, entropy=0.1, kl=3.0) == []  # still out of bounds: no repeat
    assert guard.check(4, entropy=0.52, kl=1.9) == []  # back in, but within the margin:
    assert guard.check(5, entropy=0.45, kl=2.1) == []  # hovering at the bound stays quiet
    assert guard.check(6, entropy=1.0, kl=0.1) == []  # clearly back: re-armed
    assert "entropy 0.300" in guard.check(7, entropy=0.3, kl=0.1)[0]
    assert len(logged) == 3


@pytest.mark.parametrize("settings", [
    dict(advantage="rloo"),
    dict(advantage="moving_average"),
    dict(advantage="grpo", loss="ppo_clip", loss_agg="seq-mean-token-mean", epochs=2,
         minibatches=2),
], ids=["rloo", "moving_average", "grpo_ppo_clip"])
def test_tiny_gpt2_learns_to_be_positive(settings):
    """A random-init 2-layer GPT-2 over 24 words samples near-uniformly, so VADER sentiment
    starts near 0; the update with a KL term must push the mean sentiment clearly up."""
    rollout_cfg = RolloutConfig(prompts_per_step=8, group_size=4, max_new_tokens=8)
    cfg = PolicyGradientConfig(kl_coef=0.01, **settings)
    cfg.check_rollout(batch_size=rollout_cfg.batch_size, group_size=rollout_cfg.group_size,
                      temperature=rollout_cfg.sampling.temperature)
    state = init_state(tiny_model(), optax.adam(3e-3))
    ref_params = jax.tree.map(jnp.copy, state.params)  # the step donates state.params
    update_fn = jax.jit(functools.partial(update, cfg=cfg), donate_argnums=0)
    step, collector = make_train_step(sentiment_env(), state.graphdef, rollout_cfg, n_positions=16,
                                      ref_params=ref_params, update_fn=update_fn,
                                      guard=CollapseGuard(GuardConfig(), log=lambda _: None))
    history = []
    for i in range(20):
        key = jax.random.fold_in(jax.random.key(0), i)
        # After the first step (which reads the state's step once) a step makes only explicit
        # transfers. On CPU the guard sees host-to-device ones (device-to-host is zero-copy
        # there); on an accelerator it would also catch a stray float(metric) or int(step).
        with jax.transfer_guard("disallow" if i else "allow"):
            state, metrics = step(state, None, key)
        history.append(metrics)
    history = jax.device_get(history)
    sentiment = [float(m["reward/sentiment"]) for m in history]
    assert abs(sentiment[0]) < 0.3, sentiment
    assert np.mean(sentiment[-5:]) > sentiment[0] + 0.4, sentiment
    assert float(history[-1]["kl"]) > float(history[0]["kl"])  # it moved away from the reference
    assert int(state.step) == 20 and int(state.extra["baseline"].count) == 20
    # epochs x minibatches optimizer steps inside each train step
    assert int(state.opt_state[0].count) == 20 * cfg.epochs * cfg.minibatches
    assert all(0.0 <= float(m["clip_fraction"]) <= 1.0 for m in history)
    samples = collector.last_samples.rows(4)
    assert len(samples) == 4 and {"prompt", "completion", "sentiment", "reward"} <= set(samples[0])


def test_prefetch_samples_the_next_batch_with_the_pre_update_params():
    """With rollout.prefetch the batch step i trains on was dispatched at step i-1 with the
    params before update i-1: exactly what a plain collector samples with those params."""
    rollout_cfg = RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=6, prefetch=True)
    cfg = PolicyGradientConfig(loss="is_reinforce")
    state = init_state(small_model(0), optax.adam(1e-2))
    compiled = jax.jit(functools.partial(update, cfg=cfg), donate_argnums=0)
    trained_on = []

    def update_fn(state, rollout, key):  # the real update; keeps what it was handed
        trained_on.append(jax.device_get(rollout.logprobs))
        return compiled(state, rollout, key)

    env = sentiment_env()
    step, _ = make_train_step(env, state.graphdef, rollout_cfg, n_positions=16, ref_params=None,
                              update_fn=update_fn)
    params, keys = [], []
    for i in range(3):
        keys.append(jax.random.split(jax.random.fold_in(jax.random.key(0), i))[0])  # sample keys
        params.append(jax.tree.map(jnp.copy, state.params))  # the update donates them
        state, _ = step(state, None, jax.random.fold_in(jax.random.key(0), i))
    plain = RolloutCollector(env, state.graphdef, dataclasses.replace(rollout_cfg, prefetch=False),
                             n_positions=16, ref_params=None)
    logprobs = lambda p, i, k: np.asarray(plain.collect(p, i, k).logprobs)  # noqa: E731
    np.testing.assert_allclose(trained_on[0], logprobs(params[0], 0, keys[0]), atol=1e-6)
    for i in (1, 2):
        stale = logprobs(params[i - 1], i, jax.random.fold_in(keys[i - 1], 1))
        np.testing.assert_allclose(trained_on[i], stale, atol=1e-6)
        on_policy = logprobs(params[i], i, jax.random.fold_in(keys[i - 1], 1))
        assert not np.allclose(trained_on[i], on_policy, atol=1e-4)  # the updates moved the params
    assert int(state.step) == 3


def test_recipe_without_a_checkpoint_names_the_sft_command(tmp_path, capsys):
    from jaxrl import launch

    code = launch.main(["configs/reinforce_sentiment.yaml", f"run.dir={tmp_path}",
                        f"init_from={tmp_path / 'missing'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "missing") in err and "configs/sft_gpt2_shakespeare.yaml" in err


def test_recipe_refuses_greedy_sampling_before_loading_anything(tmp_path, capsys):
    from jaxrl import launch

    code = launch.main(["configs/reinforce_sentiment.yaml", f"run.dir={tmp_path}",
                        "rollout.sampling.temperature=0"])
    assert code == 2 and "rollout.sampling.temperature=0 samples greedily" in capsys.readouterr().err


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
            "rollout.prompts_per_step=4", "rollout.group_size=2", "rollout.max_new_tokens=6",
            "loop.log_every=1", "loop.eval_every=2", "loop.checkpoint_every=2", "loop.progress=false"]
    assert launch.main([*args, "loop.steps=2"]) == 0
    assert launch.main([*args, "loop.steps=3"]) == 0  # resumes from the step-2 checkpoint

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for key in ("reward", "reward/sentiment", "reward/length_penalty", "kl", "kl_loss", "pg_loss",
                "entropy", "response_length", "baseline"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    evals = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 3]  # before training, then each eval; no re-run of 0
    assert len(evals[0]["samples"]) == 4 and "eval/sentiment" in evals[0]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 3 and (run_dir / "hf" / "model.safetensors").is_file()
