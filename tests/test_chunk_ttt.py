"""Chunk-level test-time training: fast weights, the chunk protocol, PID, baselines, the recipe.

One tiny GPT-2 (2 layers x 64, a 258-id vocabulary) and one set of random documents are
shared by the module, so the rollouts compile once."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrl.algorithms import pid_lagrangian
from jaxrl.algorithms.pid_lagrangian import PIDConfig
from jaxrl.core.config import ConfigError, build
from jaxrl.envs.text import chunk_ttt as ct
from jaxrl.models import fast_weights as fw
from jaxrl.models import gpt2

C, T, PAD, EOT = 8, 6, 257, 256
TINY = gpt2.GPT2Config(vocab_size=258, pad_id=PAD, n_layer=2, n_embd=64, n_head=2,
                       n_positions=2 * C, pad_vocab_to=1)
LENGTHS = (48, 30, 20, 17, 44, 60)  # tokens: 6, 4, 3, 3, 6 and 8 (cut at 6) chunks


def tiny_lm(seed=0):
    return gpt2.GPT2(TINY, rngs=nnx.Rngs(seed))


def token_docs(seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, 256, n)) for n in LENGTHS]


@jax.jit
def base_logits(tokens):
    return tiny_lm()(tokens)


@jax.jit
def trunk(tokens):
    return fw.trunk_states(tiny_lm(), tokens, C)


def docs_for(lm_fast, tokens):
    windows, targets, lengths, cut = ct.chunk_tokens(tokens, chunk=C, max_chunks=T, eot_id=EOT,
                                                      pad_id=PAD)
    inputs = trunk(jnp.asarray(windows.reshape(-1, 2 * C)))
    return ct.make_docs(lm_fast, inputs.reshape(*windows.shape[:2], C, -1), targets, lengths,
                        cut, PAD), windows


@pytest.fixture(scope="module")
def setup():
    fast = fw.build(tiny_lm(), fw.FastConfig(type="top", hidden=32, inner_lr=1e-2), C)
    docs, windows = docs_for(fast, token_docs())
    return fast, docs, windows, ct.ChunkTTT(fast, rho=0.5, budget=0.5)


def no_plan(docs):
    return jnp.zeros((docs.targets.shape[0], T - 1), jnp.int32)


def mixed_plan(docs):
    return jnp.asarray(np.random.default_rng(1).choice(4, (docs.targets.shape[0], T - 1)), jnp.int32)


def test_chunking_contexts_pads_and_cuts():
    windows, targets, lengths, cut = ct.chunk_tokens(token_docs(), chunk=C, max_chunks=T,
                                                      eot_id=EOT, pad_id=PAD)
    np.testing.assert_array_equal(lengths, [6, 4, 3, 3, 6, 6])
    np.testing.assert_array_equal(cut, [False] * 5 + [True])
    doc = token_docs()[1]  # 30 tokens: chunk 3 holds 6 real targets, then pads
    np.testing.assert_array_equal(windows[1, 0, :C], [PAD] * (C - 1) + [EOT])
    np.testing.assert_array_equal(windows[1, 2, :C], doc[C:2 * C])  # context = chunk 1
    np.testing.assert_array_equal(targets[1, 3], doc[3 * C:] + [PAD] * 2)


@pytest.mark.parametrize("kind", ["top", "lora"])
def test_start_weights_reproduce_the_base_model(kind):
    """B = 0 (lora) and a zero output layer (top): phi_0's chunk losses are the base model's."""
    windows, targets, *_ = ct.chunk_tokens(token_docs()[:1], chunk=C, max_chunks=T, eot_id=EOT,
                                           pad_id=PAD)
    x, y = jnp.asarray(windows[0, 2]), jnp.asarray(targets[0, 2])
    base = base_logits(x[None])[0, C - 1:-1]
    expected = optax.softmax_cross_entropy_with_integer_labels(base, y).mean()
    fast = fw.build(tiny_lm(), fw.FastConfig(type=kind, hidden=32, rank=4), C)
    inputs = trunk(x[None])[0] if kind == "top" else x
    mask = jnp.ones(C)

    @jax.jit
    def start_and_stepped(fast0, inputs):
        stepped, _, g = fast.inner_step(fast0, fast.tx.init(fast0), inputs, y, mask)
        return fast.loss(fast0, inputs, y, mask), fast.loss(stepped, inputs, y, mask), g

    start, after, g = start_and_stepped(fast.fast0, inputs)
    np.testing.assert_allclose(start, expected, rtol=1e-5)
    assert float(g) > 0 and float(after) < float(expected)


def test_anchored_rewards_sum_to_the_documents_loss_reduction(setup):
    fast, docs, windows, ttt = setup
    trace = ct.rollout(ttt, docs, ct.act_schedule, jnp.int32(0), mixed_plan(docs), jax.random.key(0))
    # l0 independently: the plain base model on every window, loss over real targets only.
    logits = base_logits(jnp.asarray(windows.reshape(-1, 2 * C)))[:, C - 1:-1]
    y = docs.targets.reshape(-1, C)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    m = (y != PAD).astype(jnp.float32)
    l0 = ((ce * m).sum(-1) / jnp.maximum(m.sum(-1), 1)).reshape(docs.loss0.shape)
    np.testing.assert_allclose(docs.loss0, l0, rtol=1e-5, atol=1e-6)
    valid = np.asarray(trace.valid)
    reduction = ((np.asarray(l0)[:, 1:] - np.asarray(trace.loss)) * valid).sum(1)
    np.testing.assert_allclose(np.asarray(trace.reward).sum(1), reduction, rtol=1e-5, atol=1e-6)
    assert np.abs(reduction).max() > 1e-3  # updates happened and changed the loss
    assert np.asarray(trace.cost).sum() > 0


def test_features_before_chunk_t_ignore_chunk_t(setup):
    """Perturbing chunk t's tokens leaves every decision before t (obs and sampled action)
    unchanged and changes the decision after it."""
    fast, docs, _, ttt = setup
    t = 3
    tokens = token_docs()
    tokens[0] = tokens[0][:t * C] + [(v + 7) % 256 for v in tokens[0][t * C:(t + 1) * C]] + tokens[0][(t + 1) * C:]
    other, _ = docs_for(fast, tokens)
    logits = jnp.log(jnp.asarray([0.4, 0.3, 0.2, 0.1]))
    a = ct.rollout(ttt, docs, ct.act_random, logits, no_plan(docs), jax.random.key(3))
    b = ct.rollout(ttt, other, ct.act_random, logits, no_plan(docs), jax.random.key(3))
    # decision index i is the decision before chunk i + 1: decisions before chunk <= t agree
    np.testing.assert_array_equal(a.obs[0, :t], b.obs[0, :t])
    np.testing.assert_array_equal(a.action[0, :t], b.action[0, :t])
    assert not np.allclose(a.obs[0, t], b.obs[0, t])  # chunk t's loss is feature 1 of decision t+1
    np.testing.assert_array_equal(a.obs[1:], b.obs[1:])  # other documents untouched


def test_vmapped_rollout_equals_a_loop_over_documents(setup):
    fast, docs, _, ttt = setup
    plan = mixed_plan(docs)
    whole = ct.rollout(ttt, docs, ct.act_schedule, jnp.int32(0), plan, jax.random.key(0))
    for i in range(docs.targets.shape[0]):
        one = jax.tree.map(lambda x: x[i:i + 1] if getattr(x, "ndim", 0) and x.shape[0] == len(LENGTHS) else x, docs)
        alone = ct.rollout(ttt, one, ct.act_schedule, jnp.int32(0), plan[i:i + 1], jax.random.key(0))
        np.testing.assert_allclose(alone.loss[0], whole.loss[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(alone.action[0], whole.action[i])


def test_env_resets_fast_weights_and_optimizer_between_documents(setup):
    fast, docs, _, ttt = setup
    env = ct.ChunkTTTEnv(ttt, T)
    params = ct.EnvParams(docs)
    obs, state = jax.jit(env.reset)(jax.random.key(0), params)
    step = jax.jit(env.step)
    ended = 0
    for i in range(12):
        obs, new, reward, term, trunc, info = step(jax.random.key(i), state, jnp.int32(3), params)
        moved = any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new.fast), jax.tree.leaves(docs.fast0)))
        if bool(term | trunc):
            ended += 1
            assert int(new.t) == 1 and not moved
            assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(new.opt)
                       if np.asarray(x).dtype == np.float32)
            assert bool(trunc) == bool(docs.cut[state.doc])
        else:
            assert moved and int(new.t) == int(state.t) + 1
        np.testing.assert_allclose(info["cost"], 4 * 0.5)
        state = new
    assert ended >= 2


def test_pid_step_response_matches_hand_computation():
    cfg = PIDConfig(budget=1.0, kp=0.5, ki=0.1, kd=0.0, alpha_p=0.5)
    state = pid_lagrangian.init(cfg)
    lams = []
    for _ in range(3):  # cost 3 = budget + 2: I = 0.2, 0.4, 0.6; P = 1, 1.5, 1.75
        state = pid_lagrangian.update(state, 3.0, cfg)
        lams.append(float(state.penalty))
    np.testing.assert_allclose(lams, [0.5 * 1.0 + 0.2, 0.5 * 1.5 + 0.4, 0.5 * 1.75 + 0.6], rtol=1e-6)
    for _ in range(200):  # at budget: P decays, I holds, lambda settles at I
        state = pid_lagrangian.update(state, 1.0, cfg)
    np.testing.assert_allclose(state.penalty, 0.6, rtol=1e-5)


def test_pid_does_not_wind_up_under_budget():
    """A long stretch under budget banks no credit: the first step over budget gets the same
    lambda as a fresh controller (rlpyt's projection of I onto >= 0), and I is capped."""
    cfg = PIDConfig(budget=1.0, kp=0.0, ki=0.5, integral_max=2.0)
    idle = pid_lagrangian.init(cfg)
    for _ in range(100):
        idle = pid_lagrangian.update(idle, 0.0, cfg)
    assert float(idle.integral) == 0.0 and float(idle.penalty) == 0.0
    fresh = pid_lagrangian.update(pid_lagrangian.init(cfg), 2.0, cfg)
    np.testing.assert_allclose(pid_lagrangian.update(idle, 2.0, cfg).penalty, fresh.penalty)
    hot = pid_lagrangian.init(cfg)
    for _ in range(100):
        hot = pid_lagrangian.update(hot, 5.0, cfg)
    assert float(hot.integral) == 2.0
    hot = pid_lagrangian.update(hot, 0.0, cfg)  # back under budget: lambda falls at once
    assert float(hot.penalty) == 1.5


def test_oracles_and_gates_spend_what_they_are_told(setup):
    fast, docs, _, ttt = setup
    valid = np.asarray(docs.valid)[:, 1:]
    gains = ct.independent_gains(ttt, docs, 1)
    plan = ct.top_q_plan(gains, valid, 0.5, 1)
    assert plan.sum() == round(0.5 * valid.sum())
    assert np.asarray(gains)[plan == 1].min() >= np.asarray(gains)[(plan == 0) & valid].max()
    # greedy oracle: lambda huge -> never pays, lambda 0 -> never worse than SKIP per chunk
    never = ct.rollout(ttt, docs, ct.act_greedy_oracle, jnp.float32(1e6), no_plan(docs), jax.random.key(0))
    assert float(never.cost.sum()) == 0.0
    free = ct.rollout(ttt, docs, ct.act_greedy_oracle, jnp.float32(0.0), no_plan(docs), jax.random.key(0))
    assert ct.summarize(free, docs, 1.0)["ce"] < ct.summarize(never, docs, 1.0)["ce"]


def test_cost_calibration_holds_the_budget_of_a_skip_biased_policy(setup):
    """A fixed policy biased toward SKIP (the learned one's failure on held-out files) spends
    a third under B; the test-time tracker (logits - mu c(a), mu reset per document) brings
    the mean over 48 rollouts within 10% of B. kappa = 0 is the plain policy, draw for draw.
    kappa 0.75, not the eval's 0.5: these documents give the tracker 2-5 decisions, not 15
    (measured: plain 0.319, kappa 0.5 0.447, kappa 0.75 0.482 against B = 0.5)."""
    fast, docs, _, ttt = setup  # rho = B = 0.5
    logits = jnp.asarray([0.0, -2.0, -2.0, -2.0])

    def tracker(kappa):
        return ct.Calibrated(policy=logits, mu=jnp.float32(0.0), kappa=jnp.float32(kappa),
                             budget=jnp.float32(ttt.budget))

    plain = ct.rollout(ttt, docs, ct.act_random, logits, no_plan(docs), jax.random.key(0))
    off = ct.rollout(ttt, docs, ct.act_random_calibrated, tracker(0.0), no_plan(docs), jax.random.key(0))
    np.testing.assert_array_equal(plain.action, off.action)

    def mean_cost(act, p):
        traces = [ct.rollout(ttt, docs, act, p, no_plan(docs), jax.random.key(i)) for i in range(48)]
        return sum(float(t.cost.sum()) for t in traces) / sum(float(t.valid.sum()) for t in traces)

    assert mean_cost(ct.act_random, logits) < 0.75 * ttt.budget
    calibrated = mean_cost(ct.act_random_calibrated, tracker(0.75))
    assert abs(calibrated - ttt.budget) / ttt.budget < 0.1, calibrated


# ---------------------------------------------------------------------------------------------
# The recipe: inputs checked before compiling, and a tiny end-to-end run that meets its budget


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny GPT-2 in HF layout and, in `tok/`, a 384-id byte-level BPE trained here on the
    json package it reads (GPT-2's 50k-id head would make every inner step ~100x dearer)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from jaxrl.data.tokenizer import EOT_TOKEN, PAD_TOKEN, Tokenizer

    path = tmp_path_factory.mktemp("base")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    texts = [f.read_text() for f in sorted(Path(json.__file__).parent.glob("*.py"))]
    hf.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=382, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf.add_special_tokens([EOT_TOKEN, PAD_TOKEN])
    (path / "tok").mkdir()
    hf.save(str(path / "tok" / "tokenizer.json"))
    tok = Tokenizer.load(path / "tok")
    cfg = dataclasses.replace(TINY, vocab_size=tok.vocab_size, pad_id=tok.pad_id, n_positions=32)
    gpt2.save_pretrained(gpt2.GPT2(cfg, rngs=nnx.Rngs(0)), path)
    return path


def recipe_config(base, tmp_path, **overrides):
    from jaxrl.recipes import chunk_ttt as recipe

    data = {"base": str(base), "run": {"dir": str(tmp_path)},
            "data": {"tokenizer": str(base / "tok"), "chunk": 16, "max_chunks": 4, "train_docs": 16,
                     "eval_docs": 4, "pattern": "json/*.py", "eval_packages": ["json"]}}
    for key, value in overrides.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return build(recipe.Config, data, source="test")


def test_bad_inputs_fail_before_compiling(base_dir, tmp_path):
    from jaxrl.recipes import chunk_ttt as recipe

    with pytest.raises(ConfigError, match="below the cheapest action"):
        recipe_config(base_dir, tmp_path, budgets=[0.0])
    with pytest.raises(ct.DocumentError, match="fewer than two chunks"):
        ct.chunk_tokens([[1] * 40, [2] * 8], chunk=8, max_chunks=4, eot_id=EOT, pad_id=PAD,
                        names=["a.py", "tiny.py"])
    other = tmp_path / "other_vocab"
    gpt2.save_pretrained(tiny_lm(), other)  # 258 ids, not the trained tokenizer's
    with pytest.raises(ConfigError, match="vocabulary of 257 ids"):
        recipe.load_base(recipe_config(other, tmp_path, **{"data.tokenizer": str(base_dir / "tok")}))
    with pytest.raises(ConfigError, match="n_positions"):
        recipe.load_base(recipe_config(base_dir, tmp_path, **{"data.chunk": 64}))


def test_initial_policy_spends_the_budget():
    """The warm start: the maximum-entropy action distribution whose mean cost is B."""
    from jaxrl.recipes.chunk_ttt import budget_logits

    costs = 0.5 * np.asarray(ct.STEPS, np.float64)
    for budget in (0.125, 0.5, 0.75):  # all under the uniform policy's 0.875
        p = np.exp(budget_logits(costs, budget))
        np.testing.assert_allclose([p.sum(), p @ costs], [1.0, budget], rtol=1e-5)
        assert np.all(np.diff(p) < 0)  # dearer actions are rarer below the uniform's cost
    assert np.exp(budget_logits(costs, 9.0)) @ costs == pytest.approx(0.9 * costs.max(), rel=1e-5)


def test_tiny_run_holds_the_policy_cost_at_its_budget(base_dir, tmp_path):
    """PPO-Lagrangian + PID at B = 0.5 rho through the launcher, from the warm start (mean
    cost B). The reward pulls toward U4 (cost rises over B in the first updates), the PID's
    lambda pushes back; the mean cost of the last 5 updates is within 10% of B (one update
    is 96 decisions, ~25% noise on its own; measured 0.538, 7.6%)."""
    from jaxrl.launch import main

    rc = main(["configs/chunk_ttt.yaml", f"run.dir={tmp_path}", f"base={base_dir}",
               f"data.tokenizer={base_dir / 'tok'}", "data.chunk=16", "data.max_chunks=6", "data.train_docs=8",
               "data.pattern=json/*.py", "data.eval_packages=[zz]", "rho=1.0", "budgets=[0.5]",
               "ppo.num_envs=16", "ppo.rollout_steps=6", "ppo.epochs=2", "ppo.minibatches=2",
               "fast.inner_lr=0.01", "ppo.lr=0.001", "loop.steps=20", "loop.log_every=1",
               "loop.progress=false"])
    assert rc == 0
    rows = [json.loads(x) for x in (tmp_path / "B0.5" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "cost_per_step" in r]
    costs = [r["cost_per_step"] for r in rows]
    assert max(costs[:8]) > 0.55  # left alone, the reward spends more than B
    assert max(r["penalty_next"] for r in rows) > 0.3  # the PID pushed back
    assert abs(np.mean(costs[-5:]) - 0.5) / 0.5 < 0.1, costs
    assert (tmp_path / "B0.5" / "policy.msgpack").is_file()
