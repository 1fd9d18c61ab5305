"""Chunk-level test-time training: fast weights, the chunk protocol, PID, baselines, the recipe.

One tiny GPT-2 (2 layers x 64, a 258-id vocabulary) and one set of random documents are
shared by the module, so the rollouts compile once."""

import dataclasses
import json
import shutil
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
from jaxrl.models.generate import generate

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


def test_adapted_rollout_ends_with_the_weights_its_plan_trained(setup):
    """`rollout_adapted` traces as `rollout` does, and a document's last weights are phi_0
    after exactly its plan's inner steps on chunks 0 .. n-2 (chunk n-1 is only scored),
    replayed here one step at a time."""
    fast, docs, _, ttt = setup
    plan = mixed_plan(docs)
    trace = ct.rollout(ttt, docs, ct.act_schedule, jnp.int32(0), plan, jax.random.key(0))
    adapted, ends = ct.rollout_adapted(ttt, docs, ct.act_schedule, jnp.int32(0), plan, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(trace), jax.tree.leaves(adapted)):
        np.testing.assert_array_equal(a, b)
    step = jax.jit(fast.inner_step)
    for doc in (1, 2):  # 4 and 3 chunks: 3 and 2 decisions
        phi, opt, steps = docs.fast0, fast.tx.init(docs.fast0), 0
        for t in range(1, int(docs.valid[doc].sum())):
            for _ in range(ct.STEPS[int(plan[doc, t - 1])]):
                phi, opt, _ = step(phi, opt, *ct.take(docs, doc, t - 1)[:3])
                steps += 1
        assert steps > 0
        for a, b in zip(jax.tree.leaves(phi), jax.tree.leaves(jax.tree.map(lambda x: x[doc], ends))):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def left_padded(rows, width):
    tokens = np.full((len(rows), width), PAD, np.int32)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):] = row
    return jnp.asarray(tokens), jnp.asarray(tokens != PAD, jnp.int32)


def test_adapted_top_model_decodes_with_the_kv_cache_as_its_full_forward(setup):
    """base + adapted fast weights (`FastLM.params`) is a model `generate` decodes: its full
    forward scores a chunk as the protocol does, and greedy decoding with the KV cache picks
    that forward's argmax at every generated position (left-padded rows included)."""
    fast, docs, windows, ttt = setup
    _, ends = ct.rollout_adapted(ttt, docs, ct.act_schedule, jnp.int32(0), mixed_plan(docs), jax.random.key(0))
    phi = jax.tree.map(lambda x: x[0], ends)
    params = fast.params(phi)
    forward = jax.jit(lambda params, tokens, mask: nnx.merge(fast.graphdef, params)(tokens, mask))
    x = jnp.asarray(windows[0, 2])[None]
    adapted = forward(params, x, jnp.ones_like(x))[0, C - 1:-1]
    np.testing.assert_allclose(adapted, jax.jit(fast.logits)(phi, docs.inputs[0, 2]), rtol=1e-4, atol=1e-4)
    assert not np.allclose(adapted, base_logits(x)[0, C - 1:-1], atol=1e-3)  # it adapted

    tokens, mask = left_padded([windows[0, 2, :6], windows[1, 2, 2:6]], 6)
    gen = generate(fast.graphdef, params, tokens, mask, jax.random.key(1), max_new_tokens=8,
                   temperature=0.0, eos_id=EOT, pad_id=PAD)
    full = np.asarray(forward(params, gen.tokens, gen.mask))  # no cache
    response = np.asarray(gen.response_mask).astype(bool)
    assert response[:, 6].all()
    for row, col in zip(*np.nonzero(response)):
        assert int(gen.tokens[row, col]) == int(full[row, col - 1].argmax()), (row, col)


@pytest.mark.parametrize("kind", ["top", "lora"])
def test_start_weights_generate_what_the_base_model_generates(kind):
    """phi_0 (a zero output layer / B = 0) merged with the base samples the base model's
    tokens, draw for draw."""
    fast = fw.build(tiny_lm(), fw.FastConfig(type=kind, hidden=32, rank=4), C)
    graphdef, weights = nnx.split(tiny_lm())
    tokens, mask = left_padded([[5, 17, 200, 3, 9, 44], [71, 2, 8]], 6)
    kw = dict(max_new_tokens=8, temperature=1.0, eos_id=EOT, pad_id=PAD)
    base = generate(graphdef, weights, tokens, mask, jax.random.key(2), **kw)
    start = generate(fast.graphdef, fast.params(fast.fast0), tokens, mask, jax.random.key(2), **kw)
    np.testing.assert_array_equal(start.tokens, base.tokens)
    np.testing.assert_allclose(start.logprobs, base.logprobs, atol=1e-5)


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


def recipe_config(base, tmp_path, recipe=None, **overrides):
    if recipe is None:
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


def eval_args(base, run_dir, *more):
    """chunk_ttt_eval on the tiny base: json/ held out, html/ + http/ for gate calibration."""
    return ["configs/chunk_ttt_eval.yaml", f"run.dir={run_dir}", f"base={base}",
            f"data.tokenizer={base / 'tok'}", "data.chunk=16", "data.max_chunks=4",
            "data.eval_docs=4", "eval.calibration_docs=4", "data.pattern=[hj]*/*.py",
            "data.eval_packages=[json]", "data.train_packages=[h*]", "rho=1.0", "budgets=[0.5]",
            "eval.bisection_steps=1",
            "loop.progress=false", *more]


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


def test_low_budgets_offer_skip_and_u1_only_and_the_file_keeps_the_set(base_dir, tmp_path):
    """Below `u1_only_below` the policy starts at the SKIP/U1 mix that spends B and never
    samples U2 / U4; its file carries the set, so an eval configured otherwise still uses it."""
    from jaxrl.recipes import chunk_ttt as recipe
    from jaxrl.recipes import chunk_ttt_eval

    cfg = recipe_config(base_dir, tmp_path, chunk_ttt_eval, **{"data.max_chunks": 4, "rho": 1.0})
    assert recipe.allowed_actions(cfg, 0.125) == (True, True, False, False)
    assert all(recipe.allowed_actions(cfg, 0.5))
    write_start_policy(cfg, tmp_path / "B0.125", 0.125)
    other = dataclasses.replace(cfg, u1_only_below=0.0)  # an eval that would allow everything
    ppo, params, obs_stats, _ = recipe.load_policy(other, None, 1.0, 0.125, 4,
                                                   tmp_path / "B0.125" / "policy.msgpack")
    obs = jnp.zeros((4096, len(ct.FEATURES)))
    actions = np.asarray(ppo.act(params, jax.random.key(0), obs, obs_stats=obs_stats, greedy=False))
    assert set(actions.tolist()) == {0, 1}  # SKIP and U1, never U2 / U4
    assert np.mean(actions == 1) * 1.0 == pytest.approx(0.125, abs=0.02)  # U1 costs rho = 1
    with pytest.raises(ConfigError, match="u1_only_below must be >= 0"):
        dataclasses.replace(cfg, u1_only_below=-1.0).validate()


def test_tiny_run_holds_the_policy_cost_at_its_budget(base_dir, tmp_path):
    """PPO-Lagrangian + PID at B = 0.5 rho through the launcher, from the warm start (mean
    cost B). The reward pulls toward U4 (cost rises over B in the first updates), the PID's
    lambda pushes back; the mean cost of the last 5 updates is within 10% of B (one update
    is 96 decisions, ~25% noise on its own; measured 0.506, 1.2%, with the shipped config's
    counterfactual reward; 0.538 with the anchored one)."""
    from jaxrl.launch import main

    rc = main(["configs/chunk_ttt.yaml", f"run.dir={tmp_path}", f"base={base_dir}",
               f"data.tokenizer={base_dir / 'tok'}", "data.chunk=16", "data.max_chunks=6", "data.train_docs=8",
               "data.pattern=json/*.py", "data.eval_packages=[zz]", "data.train_packages=['*']", "rho=1.0", "budgets=[0.5]",
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


# ---------------------------------------------------------------------------------------------
# pass@k after adapting on each prompt (chunk_ttt_eval's passk section)


def test_prompt_chunks_give_a_text_of_n_chunks_n_decisions(base_dir):
    """A text keeps its last T - 1 chunks and gains an all-pad slot for the completion, so
    the decision before the slot trains on the text's last chunk; an empty text gets no row."""
    from jaxrl.data.tokenizer import Tokenizer
    from jaxrl.recipes.chunk_ttt_eval import prompt_chunks

    tok = Tokenizer.load(base_dir / "tok")
    texts = ["", "def f(x):\n", "Serialize ``obj`` to a JSON form", json.__doc__]
    ids = [tok.encode(t) for t in texts]
    assert [len(x) for x in ids[:3]] == [0, 7, 18] and len(ids[3]) > 3 * C
    (windows, targets, lengths, cut), counts = prompt_chunks(texts, tok, chunk=C, max_chunks=4)
    np.testing.assert_array_equal(counts, [0, 1, 3, 3])  # ceil(tokens / 8), at most T - 1 = 3: 0, 7, 18, 1900+
    np.testing.assert_array_equal(lengths, counts[1:] + 1)  # n chunks + the slot: n decisions
    assert targets.shape == (3, 4, C) and not cut.any()
    for row, (x, n) in enumerate(zip(ids[1:], counts[1:])):
        kept = targets[row, :n].reshape(-1)
        np.testing.assert_array_equal(kept[kept != tok.pad_id], x[-3 * C:])
        assert (targets[row, n:] == tok.pad_id).all()  # the slot (and past it) scores nothing
    np.testing.assert_array_equal(windows[1, 0, C:], ids[2][:C])  # chunk 0 of a 3-chunk text
    assert prompt_chunks(["", ""], tok, chunk=C, max_chunks=4)[0] is None


def write_start_policy(cfg, path: Path, budget: float):
    """The untrained warm-start policy at `budget`, saved as `train_budget` saves a policy."""
    from jaxrl.algorithms.ppo import RunningStats
    from jaxrl.recipes import chunk_ttt as recipe

    env = ct.ChunkTTTEnv(ct.ChunkTTT(None, cfg.rho or 1.0, budget), cfg.data.max_chunks)
    params = nnx.split(recipe.make_ppo(cfg, env, None).make_model(jax.random.key(0)))[1]
    path.mkdir(parents=True)
    recipe.save_policy(path / "policy.msgpack", params, RunningStats.zeros((len(ct.FEATURES),)),
                       pid_lagrangian.init(dataclasses.replace(cfg.pid, budget=budget)),
                       recipe.allowed_actions(cfg, budget))


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
def test_eval_reports_pass_at_k_after_adapting_on_each_prompt(base_dir, tmp_path, shared_data):
    """Through the launcher: the CE table, then 2 MBPP tasks x 2 samples for SKIP, always-U4,
    the best heuristic and the policy at B = 0.5, graded in the sandbox. With rho = 1 the
    costs are known per decision: SKIP 0, U4 4."""
    from jaxrl.launch import main
    from jaxrl.recipes import chunk_ttt_eval

    policies = tmp_path / "policies"
    write_start_policy(recipe_config(base_dir, tmp_path, chunk_ttt_eval, **{"data.max_chunks": 4, "rho": 1.0}),
                       policies / "B0.5", 0.5)
    rc = main(eval_args(base_dir, tmp_path / "eval", f"eval.policy_dir={policies}",
                        "passk.benchmarks=[mbpp]", f"passk.data_dir={shared_data}", "passk.limit=2",
                        "passk.sampling.n_samples=2", "passk.sampling.k=[1,2]",
                        "passk.sampling.temperature=0.8", "passk.sampling.max_new_tokens=8",
                        "passk.timeout_s=5", "eval.heuristics=[periodic,loss_gate]"))
    assert rc == 0
    report = json.loads((tmp_path / "eval" / "passk.json").read_text())
    rows = report["rows"]
    assert [(r["benchmark"], r["role"]) for r in rows] == [
        ("mbpp", "skip"), ("mbpp", "update"), ("mbpp", "heuristic"), ("mbpp", "policy")]
    assert [r["method"] for r in rows[:2]] == ["SKIP", "U4"] and rows[3]["method"] == "policy"
    pareto = json.loads((tmp_path / "eval" / "pareto.json").read_text())
    heuristics = {k: v["ce"] for k, v in pareto["budgets"]["0.5"].items() if k in chunk_ttt_eval.HEURISTICS}
    assert set(heuristics) == {"periodic", "loss_gate"}  # eval.heuristics: the table's rows
    assert rows[2]["method"] == min(heuristics, key=heuristics.get) and rows[2]["budget"] == 0.5
    for r in rows:
        assert (r["tasks"], r["samples"]) == (2, 2)
        assert 0.0 <= r["pass@1"] <= r["pass@2"] <= 1.0
        lines = Path(r["results"]).read_text().splitlines()
        assert len(lines) == 2 and all(len(json.loads(x)["samples"]) == 2 for x in lines)
    chunks = report["prompts"]["mbpp"]
    assert chunks["tasks"] == 2 and chunks["unadapted"] == 0 and chunks["mean_chunks"] >= 1
    assert rows[0]["cost"] == 0.0 and rows[0]["inner_steps_per_task"] == 0.0
    assert rows[1]["cost"] == pytest.approx(4.0)
    assert rows[1]["inner_steps_per_task"] == pytest.approx(4 * chunks["mean_chunks"])
    assert report["missing"] == []


def test_bad_passk_settings_fail_before_compiling(base_dir, tmp_path, shared_data):
    from jaxrl.launch import load

    with pytest.raises(ConfigError, match=r"passk.benchmarks has \['cvdp'\]"):
        load("configs/chunk_ttt_eval.yaml", eval_args(base_dir, tmp_path)[1:] + ["passk.benchmarks=[cvdp]"])
    with pytest.raises(ConfigError, match=r"eval.heuristics=\['loss'\]; list one or more of"):
        load("configs/chunk_ttt_eval.yaml", eval_args(base_dir, tmp_path)[1:] + ["eval.heuristics=[loss]"])
    with pytest.raises(ConfigError, match=r"passk.budgets has \[0.25\], not in budgets=\[0.5\]"):
        load("configs/chunk_ttt_eval.yaml", eval_args(base_dir, tmp_path)[1:] + ["passk.budgets=[0.25]"])
    with pytest.raises(ConfigError, match="passk.benchmarks has mbpp: .*Set passk.data_dir"):
        load("configs/chunk_ttt_eval.yaml", eval_args(base_dir, tmp_path)[1:] + [
            "passk.benchmarks=[mbpp]", f"passk.data_dir={tmp_path}"])
    # 32 positions leave no room for a prompt after 32 new tokens: refused before the base loads.
    module, cfg = load("configs/chunk_ttt_eval.yaml", eval_args(base_dir, tmp_path)[1:] + [
        "passk.benchmarks=[mbpp]", f"passk.data_dir={shared_data}", "passk.sampling.max_new_tokens=32"])
    with pytest.raises(ConfigError, match="passk.sampling.max_new_tokens=32 leaves no room"):
        module.run(cfg)


def test_documents_split_three_ways_by_package(tmp_path):
    """Held-out packages are the eval split; the train split is train_packages minus those."""
    from jaxrl.recipes.chunk_ttt import ChunkDataConfig, document_files

    for rel in ("abc.py", "asyncio/base.py", "os.py", "pathlib/x.py", "typing.py", "tkinter/y.py"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    data = ChunkDataConfig(root=str(tmp_path), eval_packages=["[t-z]*"], train_packages=["[n-s]*"])
    names = lambda split: [f.relative_to(tmp_path).as_posix() for f in document_files(data, split)]  # noqa: E731
    assert names("train") == ["os.py", "pathlib/x.py"]
    assert names("eval") == ["tkinter/y.py", "typing.py"]
    everything = ChunkDataConfig(root=str(tmp_path), eval_packages=["[t-z]*"])
    assert len(document_files(everything, "train")) == 4
    with pytest.raises(ConfigError, match="train_packages"):
        document_files(ChunkDataConfig(root=str(tmp_path), train_packages=["q*"]), "train")


def test_heuristic_curve_is_the_lower_convex_hull_of_the_rules():
    from jaxrl.recipes.chunk_ttt_eval import heuristic_curve

    curve = heuristic_curve([(0.0, 5.0), (0.5, 4.8), (0.25, 4.95), (0.25, 4.85), (1.0, 4.7),
                             (2.0, 4.75)])
    assert curve(0.25) == pytest.approx(4.85)  # the better of two rules at one cost
    assert curve(0.125) == pytest.approx(4.925)  # on the chord SKIP -> (0.25, 4.85)
    assert curve(0.75) == pytest.approx(4.75)  # (0.5, 4.8) -> (1.0, 4.7)
    assert curve(1.5) == pytest.approx(4.7) == curve(3.0)  # never rises, flat past the end
    above = heuristic_curve([(0.0, 5.0), (0.5, 4.99), (1.0, 4.8)])
    assert above(0.5) == pytest.approx(4.9)  # (0.5, 4.99) lies above the chord: not a vertex
