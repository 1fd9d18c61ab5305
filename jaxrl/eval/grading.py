"""Grade Python completions in the sandbox: a worker pool, a result cache, pass@k, JSONL reports.

`PythonGrader` turns (task, completion) pairs into `SampleResult`s; `evaluate` scores any
`generate_fn(prompts) -> completions`, `grade_samples` completions already drawn; `grade_batch`
is the host-side reward call for RL recipes.
Workers are threads: each one only waits on a sandboxed subprocess, so threads use the cores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import sys
import sysconfig
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from jaxrl.eval.passk import cvdp_pass_at_k, mean_pass_at_k, pass_at_k
from jaxrl.eval.sandbox import Limits, Sandbox
from jaxrl.eval.tasks import CodeTask

HARNESS = Path(__file__).with_name("_python_harness.py")
PYTHON_LIMITS = Limits(wall_seconds=10.0, cpu_seconds=10)


@dataclasses.dataclass(frozen=True)
class SampleResult:
    task_id: str
    passed: bool
    reason: str
    tests: int = 0
    failures: int = 0
    seconds: float = 0.0
    cached: bool = False


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ResultCache:
    """Thread-safe map from a content hash to a result; identical code is graded once."""

    def __init__(self):
        self._results: dict[str, object] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(*parts: str) -> str:
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part.encode())
            digest.update(b"\0")
        return digest.hexdigest()

    def get(self, key: str):
        with self._lock:
            return self._results.get(key)

    def put(self, key: str, value) -> None:
        with self._lock:
            self._results[key] = value

    def __len__(self) -> int:
        return len(self._results)


class PythonGrader:
    """Runs candidate programs against their task's tests, in parallel, caching by content."""

    def __init__(
        self,
        sandbox: Sandbox | None = None,
        limits: Limits = PYTHON_LIMITS,
        workers: int | None = None,
        cache: bool = True,
    ):
        self.sandbox = sandbox or Sandbox("bwrap")
        self.limits = limits
        self.workers = workers or default_workers()
        self.cache = ResultCache() if cache else None
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="grader")
        self._site_packages = sysconfig.get_paths()["purelib"]

    def grade(self, task: CodeTask, completion: str) -> SampleResult:
        program = task.program(completion)
        key = ResultCache.key(task.task_id, program, task.test)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return dataclasses.replace(hit, cached=True)
        result = self._run(task, program)
        if self.cache is not None:
            self.cache.put(key, result)
        return result

    def grade_many(self, tasks: Sequence[CodeTask], completions: Sequence[str]) -> list[SampleResult]:
        if len(tasks) != len(completions):
            raise ValueError(f"got {len(tasks)} tasks but {len(completions)} completions")
        return list(self._pool.map(self.grade, tasks, completions))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _run(self, task: CodeTask, program: str) -> SampleResult:
        nonce = secrets.token_hex(16)
        job = {
            "program": program,
            "prefix": task.prefix,
            "entry_point": task.entry_point,
            "test": task.test,
            "kind": task.kind,
            "test_classes": list(task.test_classes),
            "nonce": nonce,
            "site_packages": self._site_packages,
            "isolated_pids": self.sandbox.mode == "bwrap",
        }
        run = self.sandbox.run(
            [sys.executable, "-I", "-S", str(HARNESS)],
            stdin=json.dumps(job).encode(),
            limits=self.limits,
        )
        verdict = _find_verdict(run.output, nonce)
        if verdict is None:
            reason = run.failure or (
                f"exited (code {run.returncode}) before the tests finished"
                + (f": {_last_line(run.output)}" if run.output.strip() else "")
            )
            return SampleResult(task.task_id, False, reason, seconds=run.wall_seconds)
        return SampleResult(
            task.task_id,
            bool(verdict["passed"]),
            verdict["reason"],
            int(verdict["tests"]),
            int(verdict["failures"]),
            run.wall_seconds,
        )


def _find_verdict(output: str, nonce: str) -> dict | None:
    at = output.rfind(nonce)
    if at == -1:
        return None
    try:
        return json.loads(output[at + len(nonce) :].splitlines()[0])
    except (json.JSONDecodeError, IndexError):
        return None


def _last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


_default_grader: PythonGrader | None = None
_default_lock = threading.Lock()


def default_grader() -> PythonGrader:
    global _default_grader
    with _default_lock:
        if _default_grader is None:
            _default_grader = PythonGrader()
        return _default_grader


def grade_batch(
    completions: Sequence[str], tasks: Sequence[CodeTask], grader: PythonGrader | None = None
) -> np.ndarray:
    """Host-side RL reward: 1.0 where a completion passes its task's tests, else 0.0 (float32)."""
    results = (grader or default_grader()).grade_many(tasks, completions)
    return np.array([r.passed for r in results], np.float32)


def evaluate(
    generate_fn: Callable[[list[str]], list[str]],
    tasks: Sequence[CodeTask],
    n_samples: int,
    k_list: Sequence[int] = (1,),
    *,
    grader: PythonGrader | None = None,
    results_path: str | os.PathLike | None = None,
) -> dict:
    """Sample `n_samples` completions per task with `generate_fn`, grade them, report pass@k.

    `generate_fn` gets all prompts at once (one call per sample round) so a model can batch.
    Returns {"pass@k": unbiased, "cvdp_pass@k": 1-(1-c/n)^k, "tasks", "samples", "per_task"}.
    """
    if bad := [k for k in k_list if not 1 <= k <= n_samples]:
        raise ValueError(f"pass@k needs 1 <= k <= n_samples={n_samples}; got k={bad}")
    prompts = [t.prompt for t in tasks]
    samples: list[list[str]] = [[] for _ in tasks]
    for _ in range(n_samples):
        completions = generate_fn(prompts)
        if len(completions) != len(prompts):
            raise ValueError(f"generate_fn returned {len(completions)} completions for {len(prompts)} prompts")
        for bucket, completion in zip(samples, completions):
            bucket.append(completion)
    return grade_samples(tasks, samples, k_list, grader=grader, results_path=results_path)


def grade_samples(
    tasks: Sequence[CodeTask],
    samples: Sequence[Sequence[str]],
    k_list: Sequence[int] = (1,),
    *,
    grader: PythonGrader | None = None,
    results_path: str | os.PathLike | None = None,
) -> dict:
    """Grade `samples[i]` (task i's completions, drawn however the caller likes) -> the
    summary `evaluate` returns. For samplers that cannot be a `generate_fn(prompts)`, such as
    one set of weights per task."""
    if len(samples) != len(tasks):
        raise ValueError(f"got {len(samples)} sample lists for {len(tasks)} tasks")
    if bad := [k for k in k_list if any(not 1 <= k <= len(bucket) for bucket in samples)]:
        raise ValueError(f"pass@k needs 1 <= k <= the samples of every task; got k={bad}")
    grader = grader or default_grader()
    flat_tasks = [t for t, bucket in zip(tasks, samples) for _ in bucket]
    flat_completions = [c for bucket in samples for c in bucket]
    flat_results = grader.grade_many(flat_tasks, flat_completions)

    per_task, counts, at = [], [], 0
    for task, bucket in zip(tasks, samples):
        results = flat_results[at : at + len(bucket)]
        at += len(bucket)
        correct = sum(r.passed for r in results)
        counts.append((len(bucket), correct))
        per_task.append(
            {
                "task_id": task.task_id,
                "n": len(bucket),
                "correct": correct,
                "samples": [
                    {"completion": c, "passed": r.passed, "reason": r.reason, "seconds": round(r.seconds, 3)}
                    for c, r in zip(bucket, results)
                ],
            }
        )
    summary = {
        "tasks": len(tasks),
        "samples": max((len(b) for b in samples), default=0),
        **{f"pass@{k}": mean_pass_at_k(counts, k, pass_at_k) for k in k_list},
        **{f"cvdp_pass@{k}": mean_pass_at_k(counts, k, cvdp_pass_at_k) for k in k_list},
    }
    if results_path is not None:
        write_jsonl(results_path, per_task)
    return {**summary, "per_task": per_task}


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
