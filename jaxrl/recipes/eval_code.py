"""Score a GPT-2 checkpoint (or the reference solutions) on HumanEval/MBPP/ClassEval/CVDP with pass@k.

Every program runs in the bwrap sandbox (`jaxrl.eval.sandbox`). Python benchmarks report the
unbiased pass@k and CVDP's 1-(1-c/n)^k side by side; `benchmark=cvdp` grades Verilog answers with
Icarus + cocotb and also reports the mean shaped reward. Per-task results go to
`<run dir>/results_<benchmark>.jsonl`.

  python -m jaxrl.launch configs/eval_code.yaml benchmark=humaneval references=true
  python -m jaxrl.launch configs/eval_code.yaml benchmark=mbpp checkpoint=runs/x/hf sampling.n_samples=10 sampling.k=[1,5]
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Literal

import numpy as np

from jaxrl.core.config import ConfigError, RecipeConfig
from jaxrl.eval.grading import PythonGrader, evaluate, write_jsonl
from jaxrl.eval.passk import cvdp_pass_at_k, mean_pass_at_k, pass_at_k
from jaxrl.eval.sandbox import Limits, Sandbox
from jaxrl.eval.tasks import CodeTask, extract_code, load_tasks, truncate_at_stop

# Refused with several processes (checked by `jaxrl.launch` before any device work).
SINGLE_PROCESS = ("grading runs sandboxed programs on this host and writes one results "
                  "file; run it on one host")


@dataclasses.dataclass
class SamplingConfig:
    """How completions are drawn from the checkpoint."""

    n_samples: int = 1  # completions per task
    k: list[int] = dataclasses.field(default_factory=lambda: [1])
    max_new_tokens: int = 256
    temperature: float = 0.2  # 0: greedy
    top_p: float = 0.95
    batch_size: int = 16
    max_prompt_tokens: int = 768  # longer prompts keep their last tokens

    def validate(self):
        if self.n_samples < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("sampling: n_samples, batch_size and max_new_tokens must be >= 1.")
        if bad := [k for k in self.k if not 1 <= k <= self.n_samples]:
            raise ConfigError(f"sampling.k={bad} needs 1 <= k <= sampling.n_samples={self.n_samples}; "
                              "raise n_samples or drop those k.")
        if self.temperature == 0 and self.n_samples > 1:
            raise ConfigError("sampling.temperature=0 (greedy) makes all n_samples identical; "
                              "use temperature > 0 or n_samples=1.")


@dataclasses.dataclass
class Config(RecipeConfig):
    benchmark: Literal["humaneval", "mbpp", "classeval", "cvdp"] = "humaneval"
    references: bool = False  # grade the datasets' reference solutions instead of a model
    checkpoint: str = ""  # Hugging Face-layout GPT-2 directory (e.g. an SFT run's hf/ export)
    data_dir: str = ""  # MBPP/ClassEval/CVDP root; empty: $JAXRL_DATA_DIR or ../shared/data
    mbpp_split: str = "test"
    cvdp_paths: list[str] = dataclasses.field(default_factory=list)  # empty: shared cvdp/ + ours
    rtl_harness: Literal["runner", "pytest"] = "runner"  # pytest: the problem's own test_runner.py
    limit: int = 0  # first N tasks (0: all)
    sandbox: Literal["bwrap", "process"] = "bwrap"  # process = NOT isolated; only if you must
    timeout_s: float = 10.0  # wall clock per Python sample (RTL: 6x)
    workers: int = 0  # grading threads; 0: one per core
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)

    def validate(self):
        if not self.references and not self.checkpoint:
            raise ConfigError("set checkpoint=<HF GPT-2 dir> to evaluate a model, or references=true "
                              "to grade the reference solutions.")
        if self.limit < 0 or self.timeout_s <= 0 or self.workers < 0:
            raise ConfigError("limit and workers must be >= 0 and timeout_s > 0.")


def prompt_width(s: SamplingConfig, n_positions: int) -> int:
    """Prompt tokens a sample keeps (its last ones): what `max_new_tokens` leaves of the context."""
    width = min(s.max_prompt_tokens, n_positions - s.max_new_tokens)
    if width < 1:
        raise ConfigError(f"sampling.max_new_tokens={s.max_new_tokens} leaves no room for a prompt in "
                          f"n_positions={n_positions}.")
    return width


def sample_completions(graphdef, params, tokenizer, prompts: list[str], width: int, s: SamplingConfig,
                       key, *, whole_program: bool, stops: list[tuple[str, ...]] | None = None) -> list[str]:
    """One completion per prompt, in one `generate` call: prompts left-padded to `width` (their
    last tokens kept); the answer is the first fenced block (whole programs) or the text up to
    its stop sequence (`stops[i]`, HumanEval continuations)."""
    from jaxrl.models.generate import generate

    rows = [tokenizer.encode(p)[-width:] for p in prompts]
    tokens = np.full((len(rows), width), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    gen = generate(graphdef, params, tokens, mask, key, max_new_tokens=s.max_new_tokens,
                   temperature=s.temperature, top_p=s.top_p,
                   eos_id=tokenizer.eot_id, pad_id=tokenizer.pad_id)
    new = np.asarray(gen.tokens)[:, width:]
    keep = np.asarray(gen.response_mask)[:, width:].astype(bool)
    out = []
    for i, (ids, m) in enumerate(zip(new, keep)):
        text = tokenizer.decode([int(t) for t in ids[m]], skip_special_tokens=True)
        out.append(extract_code(text) if whole_program else truncate_at_stop(text, stops[i]))
    return out


def make_generate_fn(cfg: Config, stop_for: dict[str, tuple[str, ...]], whole_program: bool):
    """prompts -> completions with `jaxrl.models.generate` on a GPT-2 checkpoint."""
    import jax

    from jaxrl.data.tokenizer import Tokenizer
    from jaxrl.models import gpt2

    path = Path(cfg.checkpoint)
    if not (path / "config.json").is_file():
        raise ConfigError(f"checkpoint={cfg.checkpoint!r}: no GPT-2 there ({path / 'config.json'} is "
                          "missing). Point it at a Hugging Face-layout export such as runs/<sft run>/hf.")
    from flax import nnx

    tokenizer = Tokenizer.gpt2()
    model = gpt2.from_pretrained(path)
    graphdef, params = nnx.split(model)
    s = cfg.sampling
    width = prompt_width(s, model.cfg.n_positions)
    key = jax.random.key(cfg.run.seed)

    def generate_fn(prompts: list[str]) -> list[str]:
        nonlocal key
        out = []
        for start in range(0, len(prompts), s.batch_size):
            chunk = prompts[start : start + s.batch_size]
            key, sample_key = jax.random.split(key)
            stops = None if whole_program else [stop_for[p] for p in chunk]
            out += sample_completions(graphdef, params, tokenizer, chunk, width, s, sample_key,
                                      whole_program=whole_program, stops=stops)
        return out

    return generate_fn


def python_tasks(benchmark: str, data_dir: str, mbpp_split: str, limit: int) -> list[CodeTask]:
    """The first `limit` tasks (0: all) of a Python benchmark."""
    kw = {"split": mbpp_split} if benchmark == "mbpp" else {}
    tasks = load_tasks(benchmark, data_dir or None, **kw)
    return tasks[:limit] if limit else tasks


def python_grader(sandbox: Sandbox, timeout_s: float, workers: int) -> PythonGrader:
    """The sandboxed grader with a `timeout_s` wall (and CPU) limit per program; workers 0: one per core."""
    limits = Limits(wall_seconds=timeout_s, cpu_seconds=max(1, int(timeout_s)))
    return PythonGrader(sandbox, limits=limits, workers=workers or None)


def _run_python(cfg: Config, sandbox: Sandbox, run_dir: Path) -> dict:
    tasks = python_tasks(cfg.benchmark, cfg.data_dir, cfg.mbpp_split, cfg.limit)
    grader = python_grader(sandbox, cfg.timeout_s, cfg.workers)
    if cfg.references:
        by_prompt = {t.prompt: t.reference for t in tasks}
        generate_fn, n, ks = (lambda prompts: [by_prompt[p] for p in prompts]), 1, [1]
    else:
        stop_for = {t.prompt: t.stop for t in tasks}
        generate_fn = make_generate_fn(cfg, stop_for, whole_program=cfg.benchmark != "humaneval")
        n, ks = cfg.sampling.n_samples, cfg.sampling.k
    out = evaluate(generate_fn, tasks, n, ks, grader=grader,
                   results_path=run_dir / f"results_{cfg.benchmark}.jsonl")
    grader.close()
    failed = [(r["task_id"], s["reason"]) for r in out["per_task"] for s in r["samples"] if not s["passed"]]
    return {k: v for k, v in out.items() if k != "per_task"} | {"first_failures": failed[:10]}


def _run_cvdp(cfg: Config, sandbox: Sandbox, run_dir: Path) -> dict:
    from jaxrl.eval.verilog import RTL_LIMITS, VerilogGrader, default_cvdp_paths, load_cvdp

    problems = load_cvdp(cfg.cvdp_paths or default_cvdp_paths(cfg.data_dir or None))
    skipped = {p.id: p.ungradable_reason for p in problems if not p.gradable}
    problems = [p for p in problems if p.gradable and (p.reference is not None or not cfg.references)]
    problems = problems[: cfg.limit] if cfg.limit else problems
    wall = 6 * cfg.timeout_s
    grader = VerilogGrader(sandbox, limits=RTL_LIMITS.replace(wall_seconds=wall, cpu_seconds=int(wall)),
                           workers=cfg.workers or None, harness=cfg.rtl_harness)
    if cfg.references:
        answers, n, ks = [[p.reference] for p in problems], 1, [1]
        raw = True
    else:
        generate_fn = make_generate_fn(cfg, {}, whole_program=True)
        n, ks = cfg.sampling.n_samples, cfg.sampling.k
        prompts = [p.full_prompt() for p in problems]
        rounds = [generate_fn(prompts) for _ in range(n)]
        answers = [[r[i] for r in rounds] for i in range(len(problems))]
        raw = False
    flat = grader.grade_many([p for p, a in zip(problems, answers) for _ in a],
                             [x for a in answers for x in a], raw_code=raw)
    grader.close()
    rows, counts, at = [], [], 0
    for problem, bucket in zip(problems, answers):
        results = flat[at : at + len(bucket)]
        at += len(bucket)
        counts.append((len(bucket), sum(r.passed for r in results)))
        rows.append({"task_id": problem.id, "n": len(bucket), "correct": counts[-1][1],
                     "samples": [dataclasses.asdict(r) | {"answer": a} for r, a in zip(results, bucket)]})
    write_jsonl(run_dir / "results_cvdp.jsonl", rows)
    if not counts:
        raise ConfigError("no gradable CVDP problems found; check cvdp_paths / data_dir.")
    return {
        "tasks": len(problems),
        "samples": n,
        **{f"pass@{k}": mean_pass_at_k(counts, k, pass_at_k) for k in ks},
        **{f"cvdp_pass@{k}": mean_pass_at_k(counts, k, cvdp_pass_at_k) for k in ks},
        "mean_reward": float(np.mean([r.reward for r in flat])),
        "skipped": skipped,
    }


def run(cfg: Config) -> dict:
    sandbox = Sandbox(cfg.sandbox)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if cfg.benchmark == "cvdp":
        summary = _run_cvdp(cfg, sandbox, run_dir)
    else:
        summary = _run_python(cfg, sandbox, run_dir)
    summary = {"benchmark": cfg.benchmark, "source": "references" if cfg.references else cfg.checkpoint,
               "sandbox": sandbox.describe(), **summary, "seconds": round(time.perf_counter() - start, 1)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    for key, value in summary.items():
        if key.startswith(("pass@", "cvdp_pass@", "mean_reward")):
            print(f"  {key:<14} {value:.4f}")
    print(f"  tasks {summary['tasks']} x {summary['samples']} samples in {summary['seconds']}s "
          f"-> {run_dir}/results_{cfg.benchmark}.jsonl", flush=True)
    return summary
