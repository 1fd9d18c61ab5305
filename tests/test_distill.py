"""On-policy distillation: the per-token reverse-KL advantage and its discounting by hand,
the update lowers the student-teacher reverse KL and raises a toy pass rate (teacher of
another architecture), a teacher with another vocabulary or tokenization is refused, and the
rtl_distill recipe runs."""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrl.algorithms.distill import (DistillConfig, check_tokenization, discounted, reverse_kl,
                                      token_advantages, update)
from jaxrl.algorithms.policy_gradient import BaselineState, init_state
from jaxrl.core.config import ConfigError
from jaxrl.envs.text import TextEnv, WordTokenizer
from jaxrl.envs.text.collector import (CollapseGuard, GuardConfig, Rollout, RolloutConfig,
                                       make_train_step)
from jaxrl.models.gpt2 import GPT2, GPT2Config

WORDS = "the a cat dog sat ran and it is day good bad".split()
TOKENIZER = WordTokenizer(WORDS)
PROMPTS = ["the cat", "a dog", "it is", "the day is"]


def test_reverse_kl_advantages_by_hand():
    logprobs = jnp.array([[0.0, -1.0, -2.0, -0.5]])
    teacher = jnp.array([[0.0, -1.5, -1.0, -9.0]])
    mask = jnp.array([[0, 1, 1, 0]])
    np.testing.assert_allclose(reverse_kl(logprobs, teacher, mask), [[0, 0.5, -1.0, 0]])
    values = jnp.array([[0.0, 1.0, 2.0, 4.0]])
    np.testing.assert_allclose(discounted(values, jnp.array([[0, 1, 1, 1]]), 0.5),
                               [[0, 1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4]])
    assert discounted(values, mask, 0.0) is values
    rollout = Rollout(tokens=jnp.zeros((2, 4), jnp.int32), mask=jnp.ones((2, 4), jnp.int32),
                      response_mask=jnp.concatenate([mask, mask]),
                      logprobs=jnp.concatenate([logprobs, logprobs]),
                      ref_logprobs=jnp.concatenate([teacher, teacher]),
                      rewards={"reward": jnp.array([1.0, 0.0])}, group_size=2)
    adv, _ = token_advantages(rollout, DistillConfig(coef=2.0), BaselineState.zero())
    np.testing.assert_allclose(adv[0], [0, -1.0, 2.0, 0])  # -coef * (log q - log p)
    # Mixing in the env reward: RLOO advantages +1 / -1, on response tokens only.
    adv, _ = token_advantages(rollout, DistillConfig(coef=1.0, reward_coef=0.5), BaselineState.zero())
    np.testing.assert_allclose(adv, [[0, 0.0, 1.5, 0], [0, -1.0, 0.5, 0]])


@pytest.mark.parametrize("bad,match", [(dict(coef=0.0), "nothing to learn"),
                                       (dict(discount=1.5), "discount"),
                                       (dict(reward_coef=-1.0), "reward_coef")])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        DistillConfig(**bad).validate()
    with pytest.raises(ConfigError, match="temperature=0"):
        DistillConfig().check_rollout(group_size=4, temperature=0.0)


def test_teacher_with_another_vocabulary_or_tokenization_is_refused():
    texts = ["the cat sat", "a dog ran"]
    check_tokenization(TOKENIZER, TOKENIZER, texts, student_vocab=14, teacher_vocab=14)
    with pytest.raises(ConfigError, match="vocabulary has 50258 entries, the student's 14"):
        check_tokenization(TOKENIZER, TOKENIZER, texts, student_vocab=14, teacher_vocab=50258)
    shuffled = WordTokenizer(WORDS[::-1])  # same size, same ids for eot / pad, other ids
    with pytest.raises(ConfigError, match="tokenize the same text differently"):
        check_tokenization(TOKENIZER, shuffled, texts, student_vocab=14, teacher_vocab=14)


def tiny(seed, n_embd, n_layer):
    cfg = GPT2Config(vocab_size=TOKENIZER.vocab_size, pad_id=TOKENIZER.pad_id, n_positions=16,
                     n_embd=n_embd, n_layer=n_layer, n_head=2)
    return GPT2(cfg, rngs=nnx.Rngs(seed))


def exact_reverse_kl(graphdef, params, teacher_graphdef, teacher_params, rollout):
    """Mean over response positions of sum_v q(v) (log q(v) - log p(v)): exact, not sampled."""
    q = jax.nn.log_softmax(nnx.merge(graphdef, params)(rollout.tokens, rollout.mask)[:, :-1])
    p = jax.nn.log_softmax(nnx.merge(teacher_graphdef, teacher_params)(rollout.tokens, rollout.mask)[:, :-1])
    per_position = (jnp.exp(q) * (q - p)).sum(-1)
    response = rollout.response_mask[:, 1:]
    return float((per_position * response).sum() / response.sum())


def sharpened(model, factor):
    """The model at temperature 1/factor: its final layer norm scaled (logits scale with it)."""
    params = nnx.state(model, nnx.Param)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * factor if "ln_f" in jax.tree_util.keystr(path) else x, params)


def first_word(text):
    return (text.split() or [""])[0]


def test_distillation_lowers_the_reverse_kl_to_the_teacher_and_raises_the_pass_rate():
    """The teacher is the student's random init at temperature 1/4 (peaked where the student
    is near uniform): 12 distillation steps on the student's own samples must close most of
    the exact per-token reverse KL on completions held fixed, and raise the pass rate of a toy
    grader (a completion passes when its first word is the teacher's greedy answer; the
    env reward is never used by the update). (A teacher of another shape scores through
    `ref_graphdef`: the recipe test below uses one.)"""
    teacher = tiny(0, 32, 1)
    teacher_params = sharpened(teacher, 4.0)
    teacher_model = nnx.merge(nnx.graphdef(teacher), teacher_params)
    answers = {}
    for prompt in PROMPTS:
        ids = jnp.array([TOKENIZER.encode(prompt)])
        answers[prompt] = first_word(TOKENIZER.decode(
            [int(teacher_model(ids, jnp.ones_like(ids))[0, -1].argmax())]))
    grade = lambda batch: {"reward": np.array(  # noqa: E731
        [first_word(t) == answers[p] for p, t in zip(batch.prompts, batch.texts)], np.float32)}
    env = TextEnv(PROMPTS, TOKENIZER, grade, max_prompt_tokens=4)
    state = init_state(tiny(0, 32, 1), optax.adam(5e-3))
    rollout_cfg = RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=8)
    step, collector = make_train_step(
        env, state.graphdef, rollout_cfg, n_positions=16, ref_params=teacher_params,
        ref_graphdef=nnx.graphdef(teacher), guard=CollapseGuard(GuardConfig(), log=lambda _: None),
        update_fn=jax.jit(functools.partial(update, cfg=DistillConfig())))
    fixed = collector.collect(state.params, 99, jax.random.key(99))
    teacher_graphdef = nnx.graphdef(teacher)
    before = exact_reverse_kl(state.graphdef, state.params, teacher_graphdef, teacher_params, fixed)

    def pass_rate(params):  # 64 fresh samples, the same keys before and after
        return np.mean([collector.collect(params, 100 + i, jax.random.key(100 + i)).rewards["reward"]
                        for i in range(4)])

    passed_before = pass_rate(state.params)
    sampled = []
    for i in range(12):
        state, metrics = step(state, None, jax.random.fold_in(jax.random.key(0), i))
        sampled.append(float(metrics["kl"]))
    after = exact_reverse_kl(state.graphdef, state.params, teacher_graphdef, teacher_params, fixed)
    assert before > 0.1 and after < 0.4 * before, (before, after, sampled)
    assert np.mean(sampled[-4:]) < np.mean(sampled[:4]), sampled
    passed_after = pass_rate(state.params)
    assert passed_after > passed_before + 0.15, (passed_before, passed_after)  # 0.17 -> 0.38 here


needs_sim = pytest.mark.skipif(shutil.which("bwrap") is None or shutil.which("iverilog") is None,
                               reason="needs bubblewrap and iverilog")


@needs_sim
def test_rtl_distill_recipe_runs_and_refuses_a_teacher_with_another_vocabulary(tmp_path, capsys):
    from jaxrl import launch
    from jaxrl.models.gpt2 import save_pretrained

    save_pretrained(GPT2(GPT2Config(n_positions=88, n_embd=16, n_layer=1, n_head=2),
                         rngs=nnx.Rngs(0)), tmp_path / "student")
    save_pretrained(GPT2(GPT2Config(n_positions=88, n_embd=32, n_layer=1, n_head=2),
                         rngs=nnx.Rngs(1)), tmp_path / "teacher")
    save_pretrained(GPT2(GPT2Config(vocab_size=1000, pad_id=999, n_positions=88, n_embd=16, n_layer=1,
                                    n_head=2), rngs=nnx.Rngs(1)), tmp_path / "other_vocab")
    args = ["configs/rtl_distill.yaml", f"run.dir={tmp_path / 'run'}",
            f"init_from={tmp_path / 'student'}", "tokenizer=gpt2", "teacher_tokenizer=gpt2",
            "rollout.prompts_per_step=4",
            "rollout.group_size=2", "rollout.max_new_tokens=8", "rtl.eval_samples=1",
            "rtl.max_prompt_tokens=80",
            "loop.steps=1", "loop.log_every=1", "loop.progress=false"]
    assert launch.main([*args, f"teacher={tmp_path / 'other_vocab'}"]) == 2
    assert "the teacher's vocabulary has 1000 entries" in capsys.readouterr().err
    assert launch.main([*args, f"teacher={tmp_path / 'teacher'}"]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["steps"] == 1 and abs(result["initial_eval/kl"]) > 1e-4  # to the teacher, not itself
    for key in ("eval/passed", "eval/kl", "train/kl", "simulations"):
        assert key in result, key
