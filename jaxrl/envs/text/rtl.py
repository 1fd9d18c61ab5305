"""RTL generation as a text environment: CVDP-format problems in, Verilog out, the simulator's
shaped reward back (`jaxrl.eval.verilog`), single-turn or multi-turn with simulator feedback.

Prompt template (one, for training, SFT corpus and eval alike): `RTLProblem.full_prompt()`
(`input.prompt`, the `input.context` files, then "Answer with the complete contents of
`<output.context file>` in one ```verilog code block.") and a newline. The
completion is parsed as the grader parses answers (the first fenced block holding a module,
else a bare `module ... endmodule`) into that file. Rewards per completion: `reward` (format
-> syntax -> fraction of cocotb tests passed), each stage (`format`, `syntax`, `tests`,
`passed`) and `graded` (1 where a simulation ran: no cache hit, for cost accounting).
Identical code is graded once (the grader caches by content).

Multi-turn (`MultiTurnCollector`): completions that fail are answered with the compiler's
errors or the failing tests' log, and the policy tries again, up to `turns` times; the
rollout the update sees is each row's final turn (prompt = problem + its last answer +
feedback), rewarded on that final design.

Problems that cannot be graded here (a commercial simulator), whose prompt does not fit the
model, or malformed rows are skipped with one line each; the run goes on with the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import jax
import numpy as np
import yaml

from jaxrl.core.config import ConfigError
from jaxrl.envs.text.collector import Rollout, RolloutCollector, Samples
from jaxrl.envs.text.env import PromptBatch, TextEnv, TextTokenizer
from jaxrl.envs.text.rewards import Completions
from jaxrl.eval.verilog import RTLProblem, RTLResult, VerilogGrader, extract_verilog, load_cvdp

PROBLEMS_DIR = Path(__file__).with_name("rtl_problems")
OWN_PROBLEMS = PROBLEMS_DIR / "jaxrl_rtl_v2.jsonl"
SPLITS = PROBLEMS_DIR / "splits.yaml"
SFT_CORPUS = PROBLEMS_DIR / "sft_corpus.jsonl"
STAGES = ("format", "syntax", "tests", "passed", "graded")


def render_prompt(problem: RTLProblem) -> str:
    """The one prompt template (see the module docstring). It ends in a single newline: GPT-2
    encodes a trailing "\n\n" as one token but "\n\n```" as two, so a prompt ending in a blank
    line would not be a token prefix of prompt + answer, and a policy SFT'd on the joint text
    would never have seen the prompt's last token before an answer."""
    return problem.full_prompt() + "\n"


def render_answer(code: str) -> str:
    """A completion in the form the SFT corpus teaches: one fenced block."""
    return f"```verilog\n{code.strip()}\n```"


@dataclasses.dataclass
class RTLEnvConfig:
    """Which problems, which split, how they are ordered and how many turns a try gets."""

    problems: list[str] = dataclasses.field(default_factory=list)  # CVDP JSONL files / dirs; empty: jaxrl's own
    data_dir: str = ""  # root for relative problem paths; empty: $JAXRL_DATA_DIR or ../shared/data
    eval_percent: int = 30  # ids not in splits.yaml go to eval by a hash of the id, this often
    max_prompt_tokens: int = 160  # longer prompts are skipped (their statement would be cut)
    curriculum: Literal["none", "size", "pass_rate"] = "none"  # easy -> hard over curriculum_steps
    curriculum_steps: int = 50  # batches until the whole training split is in play
    curriculum_start: float = 0.3  # fraction of the (sorted) problems in play at batch 0
    pass_rates: str = ""  # curriculum=pass_rate: a per-problem results JSONL (eval_code's per_task)
    turns: int = 1  # >1: multi-turn with simulator feedback
    feedback_tokens: int = 64  # simulator feedback kept per turn (its first tokens)
    answer_tokens: int = 192  # the previous answer kept in a multi-turn prompt (its first tokens)
    sandbox: Literal["bwrap", "process"] = "bwrap"
    workers: int = 0  # grader threads; 0: one per core
    eval_samples: int = 1  # completions per eval problem (pass@1 averages over them)

    def validate(self):
        if self.turns < 1 or self.eval_samples < 1 or self.max_prompt_tokens < 1:
            raise ConfigError(f"rtl: turns, eval_samples and max_prompt_tokens must be >= 1, got "
                              f"{self.turns}, {self.eval_samples}, {self.max_prompt_tokens}.")
        if not 0 <= self.eval_percent <= 100 or not 0.0 < self.curriculum_start <= 1.0:
            raise ConfigError("rtl: eval_percent must be in [0, 100] and curriculum_start in (0, 1].")
        if self.curriculum == "pass_rate" and not self.pass_rates:
            raise ConfigError("rtl.curriculum=pass_rate orders problems by a measured pass rate: set "
                              "rtl.pass_rates to a per-problem results JSONL (eval_code writes one).")

    @property
    def prompt_width(self) -> int:
        """Prompt columns: the statement, plus the last answer and feedback when multi-turn."""
        if self.turns == 1:
            return self.max_prompt_tokens
        return self.max_prompt_tokens + self.answer_tokens + self.feedback_tokens + 32


def split_of(problem_id: str, splits: dict[str, str], eval_percent: int) -> str:
    """'train' or 'eval': splits.yaml's word for our ids, else a stable hash of the id."""
    if problem_id in splits:
        return splits[problem_id]
    bucket = int(hashlib.sha256(problem_id.encode()).hexdigest(), 16) % 100
    return "eval" if bucket < eval_percent else "train"


def load_splits(path: Path = SPLITS) -> dict[str, str]:
    data = yaml.safe_load(path.read_text())
    return {pid: name for name in ("train", "eval") for pid in data.get(name, [])}


def load_problems(cfg: RTLEnvConfig, tokenizer: TextTokenizer, split: str,
                  log=print) -> list[RTLProblem]:
    """The split's problems that can be graded here and whose prompt fits; skips are logged."""
    from jaxrl.data.sources import resolve_path

    paths = [resolve_path(p, cfg.data_dir) for p in cfg.problems] or [OWN_PROBLEMS]
    errors: list[str] = []
    problems = load_cvdp(paths, errors=errors)
    splits = load_splits()
    kept, skipped = [], list(errors)
    for problem in problems:
        if split_of(problem.id, splits, cfg.eval_percent) != split:
            continue
        if problem.ungradable_reason:
            skipped.append(f"{problem.id}: {problem.ungradable_reason}")
        elif (n := len(tokenizer.encode(render_prompt(problem)))) > cfg.max_prompt_tokens:
            skipped.append(f"{problem.id}: prompt is {n} tokens, over rtl.max_prompt_tokens="
                           f"{cfg.max_prompt_tokens}")
        else:
            kept.append(problem)
    for line in skipped:
        log(f"[rtl] skipped {line}")
    if not kept:
        raise ConfigError(f"rtl: no gradable {split} problems left in {[str(p) for p in paths]} "
                          f"({len(skipped)} skipped, see above); add problems or raise "
                          "rtl.max_prompt_tokens.")
    return kept


def difficulty(problems: Sequence[RTLProblem], tokenizer: TextTokenizer, how: str,
               pass_rates: dict[str, float] | None = None) -> np.ndarray:
    """A score per problem, low = easy: reference size in tokens, or 1 - measured pass rate."""
    if how == "size":
        return np.array([len(tokenizer.encode(p.reference or p.prompt)) for p in problems], float)
    rates = pass_rates or {}
    return np.array([1.0 - rates.get(p.id, 0.0) for p in problems], float)


def read_pass_rates(path: str) -> dict[str, float]:
    """{problem id: pass rate} from a per-problem results JSONL ({task_id, n, correct} rows)."""
    rates = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rates[row["task_id"]] = row["correct"] / max(row["n"], 1)
    return rates


class RTLEnv(TextEnv):
    """A `TextEnv` over RTL problems, rewarded by the Verilog grader (one pool call per batch)."""

    def __init__(self, problems: Sequence[RTLProblem], tokenizer: TextTokenizer,
                 grader: VerilogGrader | None, *, max_prompt_tokens: int, seed: int = 0,
                 order: np.ndarray | None = None, curriculum_steps: int = 0,
                 curriculum_start: float = 1.0):
        self.problems = list(problems)
        self.grader = grader
        prompts = [render_prompt(p) for p in self.problems]
        self._by_prompt = dict(zip(prompts, self.problems))
        if len(self._by_prompt) != len(prompts):
            raise ValueError("two RTL problems render the same prompt; the env could not tell "
                             "their completions apart. Drop the duplicate.")
        super().__init__(prompts, tokenizer, self._reward, max_prompt_tokens=max_prompt_tokens,
                         seed=seed)
        self.order = order  # problem indices easy -> hard, or None (uniform)
        self.curriculum_steps = curriculum_steps
        self.curriculum_start = curriculum_start
        self.last_results: list[RTLResult] = []

    def in_play(self, index: int) -> int:
        """How many of the easiest problems batch `index` draws from (all without a curriculum)."""
        if self.order is None:
            return len(self.problems)
        ramp = min(1.0, index / max(self.curriculum_steps, 1))
        fraction = self.curriculum_start + (1.0 - self.curriculum_start) * ramp
        return max(1, int(round(fraction * len(self.problems))))

    def prompt_batch(self, index: int, num_prompts: int) -> PromptBatch:
        if self.order is None:
            return super().prompt_batch(index, num_prompts)
        pool = self.order[: self.in_play(index)]
        rng = np.random.default_rng((self.seed, index))
        chosen = rng.choice(pool, num_prompts, replace=num_prompts > len(pool))
        return self._batch([int(i) for i in chosen])

    def _batch(self, chosen: list[int]) -> PromptBatch:
        tokens = np.full((len(chosen), self.max_prompt_tokens), self.tokenizer.pad_id, np.int32)
        mask = np.zeros_like(tokens)
        for row, i in enumerate(chosen):
            ids = self._prompt_ids[i]
            tokens[row, -len(ids):] = ids
            mask[row, -len(ids):] = 1
        return PromptBatch([self.prompts[i] for i in chosen], tokens, mask)

    def problem(self, prompt: str) -> RTLProblem:
        return self._by_prompt[prompt]

    def grade(self, problems: Sequence[RTLProblem], answers: Sequence[str]) -> list[RTLResult]:
        """One grader-pool call for the batch; without a grader only the format stage (no
        simulation: a run that does not use the reward pays for none)."""
        if self.grader is None:
            self.last_results = [
                RTLResult(p.id, 0.0, extract_verilog(a) is not None, False, 0, 0, "not simulated")
                for p, a in zip(problems, answers)]
        else:
            # Identical code in one batch is simulated once (the grader's cache covers batches).
            keys = [(p.id, extract_verilog(a) or a) for p, a in zip(problems, answers)]
            first = {}
            for i, key in enumerate(keys):
                first.setdefault(key, i)
            unique = sorted(first.values())
            graded = dict(zip(unique, self.grader.grade_many([problems[i] for i in unique],
                                                             [answers[i] for i in unique])))
            self.last_results = [graded[i] if i in graded else
                                 dataclasses.replace(graded[first[k]], cached=True)
                                 for i, k in enumerate(keys)]
        return self.last_results

    def _reward(self, batch: Completions) -> dict[str, np.ndarray]:
        results = self.grade([self.problem(p) for p in batch.prompts], batch.texts)
        return stage_rewards(results)


def stage_rewards(results: Sequence[RTLResult]) -> dict[str, np.ndarray]:
    """The shaped reward and each stage, float32 [B]."""
    columns = {
        "reward": [r.reward for r in results],
        "format": [r.format_ok for r in results],
        "syntax": [r.syntax_ok for r in results],
        "tests": [r.tests_fraction for r in results],
        "passed": [r.passed for r in results],
        "graded": [r.format_ok and not r.cached and r.reason != "not simulated" for r in results],
    }
    return {k: np.asarray(v, np.float32) for k, v in columns.items()}


def feedback(result: RTLResult) -> str:
    """What the simulator said, short: compile errors, or the failing assertions and tests."""
    if not result.format_ok:
        return "No Verilog module was found in the answer."
    if not result.syntax_ok:
        return "The design does not compile:\n" + (result.log or result.reason).strip()
    lines = [re.sub(r"\s+", " ", line).strip() for line in result.log.splitlines()]
    keep = [line for line in lines if "Error" in line or " FAIL " in line]
    head = f"The design compiles but {result.reason.removeprefix('tests: ')}."
    return "\n".join([head, *keep]) if keep else head


def retry_prompt(problem: RTLProblem, answer: str, result: RTLResult, tokenizer: TextTokenizer,
                 cfg: RTLEnvConfig) -> str:
    """The next turn's prompt: the problem, the last answer and what the simulator said."""
    code = extract_verilog(answer) or answer
    code = tokenizer.decode(tokenizer.encode(code)[: cfg.answer_tokens])
    said = tokenizer.decode(tokenizer.encode(feedback(result))[: cfg.feedback_tokens])
    return (f"{problem.full_prompt()}\n\nA previous answer was:\n```verilog\n{code.strip()}\n```\n"
            f"Simulator feedback:\n{said.strip()}\nFix the design.\n\n")


class MultiTurnCollector(RolloutCollector):
    """Collects multi-turn rollouts: failing rows get the simulator's feedback and retry.

    Every turn samples all still-failing rows in one batch (rows that passed keep their
    answer); the rollout is each row's final turn with the reward of its final design. Logs
    `first_turn_passed` and `turns_used` beside the stage rewards.
    """

    can_prefetch = False

    def __init__(self, env: RTLEnv, graphdef, cfg, rtl: RTLEnvConfig, **kwargs):
        if env.max_prompt_tokens != rtl.prompt_width:
            raise ValueError(f"multi-turn prompts are {rtl.prompt_width} tokens wide "
                             f"(rtl.prompt_width); build the env with max_prompt_tokens=that.")
        super().__init__(env, graphdef, cfg, **kwargs)
        self.rtl = rtl

    def collect(self, params, index: int, key: jax.Array) -> Rollout:
        cfg, env = self.cfg, self.env
        prompts = env.prompt_batch(index, cfg.prompts_per_step)
        texts = [t for t in prompts.texts for _ in range(cfg.group_size)]
        problems = [env.problem(t) for t in texts]
        tokens = np.repeat(prompts.tokens, cfg.group_size, axis=0)
        mask = np.repeat(prompts.mask, cfg.group_size, axis=0)
        final, rows_prompt, first_passed, turns_used = self.turns(params, problems, texts, tokens,
                                                                  mask, key)
        generation = {k: self._place(v) for k, v in final.items() if k not in ("texts", "results")}
        ref = generation["logprobs"]
        if self.ref_params is not None:
            ref = self._ref_logprobs(self.ref_graphdef, self.ref_params, generation["tokens"],
                                     generation["mask"])
        rewards = stage_rewards(final["results"])
        rewards |= {"first_turn_passed": first_passed, "turns_used": turns_used}
        self.last_samples = Samples(rows_prompt, final["texts"], rewards)
        return Rollout(tokens=generation["tokens"], mask=generation["mask"],
                       response_mask=generation["response_mask"], logprobs=generation["logprobs"],
                       ref_logprobs=ref, rewards={k: self._place(v) for k, v in rewards.items()},
                       group_size=cfg.group_size, sampling=cfg.sampling)

    def turns(self, params, problems, texts, tokens, mask, key):
        """Sample, grade and retry; -> (final turn per row, its prompts, first-turn pass, turns)."""
        env, width = self.env, self.env.max_prompt_tokens
        batch = len(problems)
        final: dict = {"results": [None] * batch, "texts": [""] * batch}
        prompts = list(texts)
        active = np.arange(batch)
        first_passed = np.zeros(batch, np.float32)
        turns_used = np.zeros(batch, np.float32)
        for turn in range(self.rtl.turns):
            generation = jax.device_get(self.sample(params, tokens, mask, jax.random.fold_in(key, turn)))
            n = len(active)  # later turns pad the batch by repeating a row: drop those
            answers = env.completions([prompts[i] for i in active], generation.tokens[:n, width:],
                                      generation.response_mask[:n, width:]).texts
            results = env.grade([problems[i] for i in active], answers)
            for field in ("tokens", "mask", "response_mask", "logprobs"):
                value = np.asarray(getattr(generation, field))[:n]
                if field not in final:
                    final[field] = np.zeros((batch, *value.shape[1:]), value.dtype)
                final[field][active] = value
            retry = []
            for j, (row, answer, result) in enumerate(zip(active, answers, results)):
                final["results"][row], final["texts"][row] = result, answer
                turns_used[row] = turn + 1
                if turn == 0:
                    first_passed[row] = result.passed
                if not result.passed:
                    retry.append((j, row, retry_prompt(problems[row], answer, result,
                                                       env.tokenizer, self.rtl)))
            if not retry or turn == self.rtl.turns - 1:
                break
            # The next turn samples only the failing rows, padded to the compiled batch shape.
            active = np.array([row for _, row, _ in retry])
            for _, row, prompt in retry:
                prompts[row] = prompt
            tokens, mask = self._left_pad([prompts[i] for i in active], width)
        return final, prompts, first_passed, turns_used

    def _left_pad(self, prompts: list[str], width: int) -> tuple[np.ndarray, np.ndarray]:
        """Prompt rows padded to the batch the sampler compiled for (repeating the last row)."""
        rows = self.cfg.batch_size
        tokens = np.full((rows, width), self.env.tokenizer.pad_id, np.int32)
        mask = np.zeros_like(tokens)
        for row in range(rows):
            ids = self.env.tokenizer.encode(prompts[min(row, len(prompts) - 1)])[-width:]
            tokens[row, -len(ids):] = ids
            mask[row, -len(ids):] = 1
        return tokens, mask
