"""The RTL env: problems load (bad rows and commercial-simulator harnesses skipped, said why),
the split is by id, completions are graded in stages with identical code simulated once, the
multi-turn collector feeds the simulator log back and scores the final turn, and RL on the
real grader raises the mean reward; the rtl_rl recipe runs end to end."""

import copy
import functools
import json
import shutil

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrl.algorithms.policy_gradient import PolicyGradientConfig, init_state, update
from jaxrl.core.config import ConfigError
from jaxrl.data.tokenizer import Tokenizer
from jaxrl.envs.text.collector import CollapseGuard, GuardConfig, RolloutConfig, make_train_step
from jaxrl.envs.text.rtl import (OWN_PROBLEMS, MultiTurnCollector, RTLEnv, RTLEnvConfig, feedback,
                                 load_problems, load_splits, render_answer, render_prompt)
from jaxrl.eval.sandbox import Sandbox
from jaxrl.eval.verilog import VerilogGrader, load_cvdp
from jaxrl.models.generate import Generation, Sampling
from jaxrl.models.gpt2 import GPT2, GPT2Config

needs_sim = pytest.mark.skipif(
    shutil.which("bwrap") is None or shutil.which("iverilog") is None,
    reason="needs bubblewrap and iverilog (apt-get install -y bubblewrap iverilog)")

GPT2_TOKENIZER = Tokenizer.gpt2()


@pytest.fixture(scope="module")
def problems():
    return {p.id: p for p in load_cvdp([OWN_PROBLEMS])}


@pytest.fixture(scope="module")
def grader():
    if shutil.which("bwrap") is None:
        pytest.skip("needs bubblewrap")
    grader = VerilogGrader(Sandbox("bwrap"))
    yield grader
    grader.close()


def test_own_problem_set_and_split_by_id(problems):
    splits = load_splits()
    train = [i for i in problems if splits[i] == "train"]
    held_out = [i for i in problems if splits[i] == "eval"]
    assert len(problems) >= 30 and set(splits) == set(problems)
    assert len(held_out) >= 20 and not set(train) & set(held_out)
    families = {problems[i].categories[-1] for i in held_out}
    # Every held-out design has a trained sibling (another width, pattern or depth).
    assert families <= {problems[i].categories[-1] for i in train}
    kinds = {c for p in problems.values() for c in p.categories}
    assert {"combinational", "sequential", "fifo", "seq_detector", "up_counter", "alu"} <= kinds
    for p in problems.values():
        assert p.gradable and p.reference and render_prompt(p).endswith("code block.\n")
        # The prompt's tokens are a prefix of prompt + answer's: what SFT saw, RL continues.
        prompt = GPT2_TOKENIZER.encode(render_prompt(p))
        assert GPT2_TOKENIZER.encode(render_prompt(p) + render_answer(p.reference))[:len(prompt)] == prompt
    corpus = (OWN_PROBLEMS.parent / "sft_corpus.jsonl").read_text()
    for i in held_out:  # no eval design leaks into the SFT corpus
        assert problems[i].reference not in corpus and render_prompt(problems[i]) not in corpus


def test_bad_rows_and_commercial_harnesses_are_skipped_with_reasons(tmp_path, problems):
    good = json.loads(OWN_PROBLEMS.read_text().splitlines()[0])
    commercial = copy.deepcopy(good)
    commercial["id"] = "needs_xcelium"
    commercial["harness"]["files"]["src/.env"] = commercial["harness"]["files"]["src/.env"].replace(
        "icarus", "xcelium")
    long = copy.deepcopy(good)
    long["id"], long["input"]["prompt"] = "too_long", "Write it. " * 200
    no_prompt = {"id": "broken", "input": {"context": {}}, "output": {"context": {}}}
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([json.dumps(good), "{not json", json.dumps(no_prompt),
                               json.dumps(commercial), json.dumps(long)]) + "\n")
    with pytest.raises(ValueError, match=r"mixed.jsonl:2: malformed CVDP row"):
        load_cvdp([path])
    logged = []
    cfg = RTLEnvConfig(problems=[str(path)], eval_percent=0, max_prompt_tokens=192)
    kept = load_problems(cfg, GPT2_TOKENIZER, "train", log=logged.append)
    # The good row is in splits.yaml's train split; the others fall to the hash (eval_percent=0).
    assert [p.id for p in kept] == [good["id"]]
    text = "\n".join(logged)
    assert "mixed.jsonl:2: malformed" in text and "mixed.jsonl:3: malformed" in text
    assert "missing key 'prompt'" in text
    assert "needs_xcelium: not gradable here: needs SIM=xcelium" in text
    assert "too_long: prompt is" in text and "rtl.max_prompt_tokens=192" in text
    with pytest.raises(ConfigError, match="no gradable eval problems"):
        load_problems(cfg, GPT2_TOKENIZER, "eval", log=logged.append)


@pytest.fixture(scope="module")
def counter_fsm(problems):
    return problems["jaxrl_rtl2_up_counter_0037"], problems["jaxrl_rtl2_seq_detector_0055"]


def test_curriculum_draws_easy_problems_first(problems):
    from jaxrl.envs.text.rtl import difficulty

    chosen = [problems[i] for i in sorted(problems)[:12]]
    size = difficulty(chosen, GPT2_TOKENIZER, "size")
    order = size.argsort(kind="stable")
    env = RTLEnv(chosen, GPT2_TOKENIZER, None, max_prompt_tokens=192, order=order,
                 curriculum_steps=10, curriculum_start=0.25)
    assert [env.in_play(i) for i in (0, 5, 10, 50)] == [3, 8, 12, 12]
    easiest = {render_prompt(chosen[i]) for i in order[:3]}
    assert set(env.prompt_batch(0, 8).texts) <= easiest
    late = {t for i in range(10, 20) for t in env.prompt_batch(i, 8).texts}
    assert len(late) > 6 and env.prompt_batch(3, 8).texts == env.prompt_batch(3, 8).texts
    rates = difficulty(chosen, GPT2_TOKENIZER, "pass_rate", {chosen[0].id: 1.0})
    assert rates[0] == 0.0 and rates[1:].min() == 1.0  # solved = easiest


@needs_sim
def test_env_scores_each_stage_and_grades_identical_code_once(grader, counter_fsm):
    counter, fsm = counter_fsm
    env = RTLEnv([counter, fsm], GPT2_TOKENIZER, grader, max_prompt_tokens=192)
    wrong = counter.reference.replace("count + 1'b1", "count + 2'd2")
    texts = [render_answer(counter.reference), "module up_counter_4(input clk", "no code at all",
             render_answer(wrong), f"Here:\n{render_answer(counter.reference)}\nDone.",
             render_answer(fsm.reference)]
    prompts = [render_prompt(p) for p in (counter,) * 5 + (fsm,)]
    ids = [GPT2_TOKENIZER.encode(t) + [GPT2_TOKENIZER.eot_id] for t in texts]
    width = max(map(len, ids))
    tokens = np.array([row + [GPT2_TOKENIZER.pad_id] * (width - len(row)) for row in ids])
    mask = np.array([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    rewards = env.score(env.completions(prompts, tokens, mask))
    np.testing.assert_allclose(rewards["reward"], [1.0, 0.0, 0.0, 0.3, 1.0, 1.0], atol=1e-6)
    np.testing.assert_array_equal(rewards["format"], [1, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(rewards["syntax"], [1, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(rewards["passed"], [1, 0, 0, 0, 1, 1])
    # The same code in another wrapping was simulated once (the second is a cache hit).
    assert rewards["graded"][[0, 4]].sum() == 1 and rewards["graded"][[3, 5]].all()
    said = feedback(env.last_results[3])
    assert "3/3 cocotb tests failed" in said and "count = 2, expected 1" in said


class ScriptedSampler:
    """Stands in for the policy: answers from the prompt text, as a model's tokens would."""

    def __init__(self, answer, width, new_tokens):
        self.answer, self.width, self.new_tokens = answer, width, new_tokens
        self.prompts = []

    def __call__(self, params, tokens, mask, key):
        tokens, mask = np.asarray(tokens), np.asarray(mask)
        rows = []
        for t, m in zip(tokens, mask):
            prompt = GPT2_TOKENIZER.decode([int(i) for i, k in zip(t, m) if k])
            self.prompts.append(prompt)
            ids = (GPT2_TOKENIZER.encode(self.answer(prompt)) + [GPT2_TOKENIZER.eot_id])[: self.new_tokens]
            rows.append(ids + [GPT2_TOKENIZER.pad_id] * (self.new_tokens - len(ids)))
        new = np.array(rows, np.int32)
        response = (np.arange(self.new_tokens) < (new != GPT2_TOKENIZER.pad_id).sum(1)[:, None])
        return Generation(tokens=np.concatenate([tokens, new], 1),
                          mask=np.concatenate([mask, response], 1).astype(np.int32),
                          response_mask=np.concatenate([np.zeros_like(mask), response], 1).astype(np.int32),
                          logprobs=np.concatenate([np.zeros(mask.shape), -response.astype(np.float32)], 1).astype(np.float32))


@needs_sim
def test_multi_turn_feeds_the_simulator_log_back_and_scores_the_final_turn(grader, counter_fsm):
    counter, fsm = counter_fsm
    rtl = RTLEnvConfig(turns=3, max_prompt_tokens=192)
    env = RTLEnv([counter, fsm], GPT2_TOKENIZER, grader, max_prompt_tokens=rtl.prompt_width)
    wrong = counter.reference.replace("count + 1'b1", "count + 2'd2")

    def answer(prompt):  # the counter is wrong until the simulator says why; the FSM is right
        if "seq_det_101" in prompt:
            return render_answer(fsm.reference)
        return render_answer(counter.reference if "expected 1" in prompt else wrong)

    cfg = RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=320,
                        sampling=Sampling(temperature=1.0))
    model = GPT2(GPT2Config(vocab_size=GPT2_TOKENIZER.vocab_size, n_positions=1024, n_embd=8,
                            n_layer=1, n_head=1), rngs=nnx.Rngs(0))
    collector = MultiTurnCollector(env, nnx.graphdef(model), cfg, rtl, n_positions=1024,
                                   ref_params=None)
    collector.sample = ScriptedSampler(answer, rtl.prompt_width, cfg.max_new_tokens)
    rollout = jax.device_get(collector.collect(None, 0, jax.random.key(0)))
    is_counter = np.array(["up_counter_4" in p for p in collector.sample.prompts[:4]])
    assert is_counter.sum() == 2  # 2 prompts x 2 samples, one prompt each
    np.testing.assert_array_equal(rollout.rewards["passed"], [1, 1, 1, 1])
    np.testing.assert_array_equal(rollout.rewards["first_turn_passed"], ~is_counter)
    np.testing.assert_array_equal(rollout.rewards["turns_used"], np.where(is_counter, 2, 1))
    # The second turn (only the two failing rows, padded to the batch) saw the log.
    retry = collector.sample.prompts[4]
    assert "A previous answer was:" in retry and "count + 2'd2" in retry
    assert "Simulator feedback:" in retry and "count = 2, expected 1" in retry
    # The rollout holds each row's final turn: its prompt is the retry prompt.
    for row in np.flatnonzero(is_counter):
        prompt = GPT2_TOKENIZER.decode([int(t) for t, m in zip(rollout.tokens[row, :rtl.prompt_width],
                                                               rollout.mask[row]) if m])
        assert "Simulator feedback:" in prompt
    assert len(collector.sample.prompts) == 8  # two turns: the FSM rows were not re-sampled


class AnswerTokenizer:
    """A token per whole answer (and per prompt), so a tiny policy's completions are few
    distinct designs: the real grader simulates each once, then the cache answers."""

    def __init__(self, phrases):
        self.phrases = list(phrases)
        self.eot_id, self.pad_id = len(self.phrases), len(self.phrases) + 1
        self.vocab_size = len(self.phrases) + 2

    def encode(self, text):
        return [self.phrases.index(text)]

    def decode(self, ids):
        return "".join(self.phrases[i] for i in map(int, ids) if i < self.eot_id)


@needs_sim
def test_rl_on_the_real_grader_raises_mean_reward(grader, counter_fsm):
    counter, fsm = counter_fsm
    wrong = counter.reference.replace("count + 1'b1", "count + 2'd2")
    # Per problem: its reference (reward 1), a wrong counter (0.3), the other problem's
    # module (0.1: its top level is missing) or no code (0): six designs to simulate.
    answers = [render_answer(c) for c in (counter.reference, wrong, fsm.reference)]
    answers.append("I am not sure.\n")
    tokenizer = AnswerTokenizer([render_prompt(counter), render_prompt(fsm), *answers])
    env = RTLEnv([counter, fsm], tokenizer, grader, max_prompt_tokens=1)
    # As rtl_rl runs it: the next batch samples while the grader simulates this one.
    rollout_cfg = RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=2, prefetch=True)
    cfg = PolicyGradientConfig(advantage="rloo", kl_coef=0.0)
    model = GPT2(GPT2Config(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, n_positions=4,
                            n_embd=32, n_layer=1, n_head=2), rngs=nnx.Rngs(0))
    state = init_state(model, optax.adam(3e-2))
    step, _ = make_train_step(env, state.graphdef, rollout_cfg, n_positions=4, ref_params=None,
                              update_fn=jax.jit(functools.partial(update, cfg=cfg)),
                              guard=CollapseGuard(GuardConfig(), log=lambda _: None))
    simulated = len(grader.cache)
    rewards, passed = [], []
    for i in range(12):
        state, metrics = step(state, None, jax.random.fold_in(jax.random.key(0), i))
        rewards.append(float(metrics["reward"]))
        passed.append(float(metrics["reward/passed"]))
    assert np.mean(rewards[:3]) < 0.6, rewards
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.25, rewards
    assert np.mean(passed[-3:]) > np.mean(passed[:3]), passed
    assert len(grader.cache) - simulated <= 6  # each distinct design simulated once


@needs_sim
def test_rtl_rl_recipe_runs_and_refuses_a_model_too_short(tmp_path, capsys):
    """The launch path on 8 fake devices with a random tiny GPT-2 (its samples hold no code,
    so nothing is simulated): a step, the eval split scored before and after, a summary.
    Prompts up to 80 tokens keep the run small (the longer problems are skipped)."""
    from jaxrl import launch
    from jaxrl.models.gpt2 import save_pretrained

    save_pretrained(GPT2(GPT2Config(n_positions=88, n_embd=16, n_layer=1, n_head=2),
                         rngs=nnx.Rngs(0)), tmp_path / "sft")
    save_pretrained(GPT2(GPT2Config(vocab_size=1000, pad_id=999, n_positions=88, n_embd=16,
                                    n_layer=1, n_head=2), rngs=nnx.Rngs(0)), tmp_path / "other_vocab")
    args = ["configs/rtl_rl.yaml", f"run.dir={tmp_path / 'run'}", f"init_from={tmp_path / 'sft'}",
            "tokenizer=gpt2", "rtl.max_prompt_tokens=80",
            "rollout.prompts_per_step=4", "rollout.group_size=2", "rollout.max_new_tokens=8",
            "rtl.eval_samples=1", "loop.steps=1", "loop.log_every=1", "loop.progress=false"]
    assert launch.main([*args, "rollout.max_new_tokens=64"]) == 2
    assert "exceeds the model's n_positions=88" in capsys.readouterr().err
    assert launch.main([*args, "rtl.turns=2"]) == 2  # the config prefetches; multi-turn cannot
    assert "set rollout.prefetch=false with multi-turn" in capsys.readouterr().err
    assert launch.main([*args, f"init_from={tmp_path / 'other_vocab'}"]) == 2
    assert "has a vocabulary of 999 ids (+ pad) but the tokenizer 'gpt2'" in capsys.readouterr().err
    assert launch.main(args) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["steps"] == 1 and "simulations" in result
    for key in ("eval/passed", "eval/format", "eval/syntax", "eval/tests", "eval/kl",
                "initial_eval/passed", "train/reward/passed", "train/reward/graded"):
        assert key in result, key
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["entropy"]) for r in rows if "entropy" in r)
