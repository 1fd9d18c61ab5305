"""Grade Verilog/SystemVerilog answers on CVDP-format problems with Icarus + cocotb, sandboxed.

A CVDP problem (NVlabs/cvdp_benchmark JSONL) carries a prompt, context files, the files the
answer must provide, and a cocotb harness whose `src/.env` names SIM / TOPLEVEL / MODULE /
VERILOG_SOURCES (docker paths under /code and /src). We lay the harness out in a scratch dir,
map those paths onto it and run the test module through `cocotb_tools.runner` - no Docker -
inside the bwrap sandbox with a wall timeout.

Reward is shaped and each stage is reported: format (a code block could be extracted) ->
syntax (Icarus compiles it) -> tests (fraction of cocotb tests passed, from results.xml).
Only SIM=icarus problems can be graded here; the rest (Xcelium coverage tasks) load but grade
as `gradable=False` with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from jaxrl.eval.grading import ResultCache, default_workers
from jaxrl.eval.sandbox import Limits, Sandbox, scratch_dir

DRIVER = Path(__file__).with_name("_cocotb_driver.py")
OWN_PROBLEMS = Path(__file__).with_name("rtl_problems") / "jaxrl_rtl_v1.jsonl"
RTL_LIMITS = Limits(wall_seconds=60.0, cpu_seconds=60, memory_bytes=4 << 30, tmpfs_bytes=256 << 20)
SUPPORTED_SIMULATORS = ("icarus",)


@dataclasses.dataclass(frozen=True)
class RewardWeights:
    """reward = format * w_format + syntax * w_syntax + tests_fraction * w_tests (sums to 1)."""

    format: float = 0.1
    syntax: float = 0.2
    tests: float = 0.7


@dataclasses.dataclass(frozen=True)
class RTLProblem:
    id: str
    categories: tuple[str, ...]
    prompt: str
    context: dict[str, str]  # files shown to the model, by repo-relative path
    target: str  # the file the answer must provide, e.g. "rtl/lfsr_8bit.sv"
    reference: str | None  # reference contents of `target` (from *_with_solutions files)
    harness: dict[str, str]  # "src/.env", "src/test_x.py", ...
    env: dict[str, str]

    @property
    def simulator(self) -> str:
        return self.env.get("SIM", "icarus").lower()

    @property
    def ungradable_reason(self) -> str | None:
        if "MODULE" not in self.env or "TOPLEVEL" not in self.env:
            return "not gradable here: no cocotb MODULE/TOPLEVEL in src/.env (a coverage-graded task)"
        if self.simulator not in SUPPORTED_SIMULATORS:
            return f"not gradable here: needs SIM={self.simulator} (supported: {', '.join(SUPPORTED_SIMULATORS)})"
        return None

    @property
    def gradable(self) -> bool:
        return self.ungradable_reason is None

    def full_prompt(self) -> str:
        """Prompt plus context files, asking for one fenced code block (the CVDP non-agentic style)."""
        parts = [self.prompt.strip()]
        for path, text in self.context.items():
            parts.append(f"File `{path}`:\n```\n{text}\n```")
        parts.append(f"Answer with the complete contents of `{self.target}` in one ```verilog code block.")
        return "\n\n".join(parts)


@dataclasses.dataclass(frozen=True)
class RTLResult:
    problem_id: str
    reward: float
    format_ok: bool
    syntax_ok: bool
    tests: int
    failed: int
    reason: str
    seconds: float = 0.0
    cached: bool = False
    log: str = ""  # the compiler's errors or the failing tests' simulator log (tail), as feedback

    @property
    def tests_fraction(self) -> float:
        return (self.tests - self.failed) / self.tests if self.tests else 0.0

    @property
    def passed(self) -> bool:
        return self.tests > 0 and self.failed == 0


def parse_env(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key.strip()] = value.strip()
    return env


def apply_hunks(original: str, patch: str) -> str:
    """Apply a unified diff's hunks (CVDP agentic `patch` entries carry hunks without headers)."""
    old = original.splitlines()
    out: list[str] = []
    at = 0  # index into old
    lines = patch.splitlines()
    i = 0
    while i < len(lines):
        header = re.match(r"@@ -(\d+)(?:,(\d+))? \+\d+(?:,\d+)? @@", lines[i])
        if not header:
            i += 1
            continue
        start = int(header.group(1))
        start = start - 1 if header.group(2) != "0" else start
        out.extend(old[at:start])
        at = start
        i += 1
        while i < len(lines) and not lines[i].startswith("@@"):
            line = lines[i]
            if line.startswith("\\"):  # "\ No newline at end of file"
                pass
            elif line.startswith("+"):
                out.append(line[1:])
            elif line.startswith("-"):
                at += 1
            else:
                out.append(old[at] if at < len(old) else line[1:])
                at += 1
            i += 1
    out.extend(old[at:])
    return "\n".join(out) + "\n"


def _problem_from_row(row: dict) -> RTLProblem | None:
    """A CVDP code-generation row (non-agentic or agentic layout), or None if it has no harness."""
    if "input" in row:  # non-agentic: input.{prompt,context}, output.context, harness.files
        prompt, context = row["input"]["prompt"], row["input"].get("context") or {}
        outputs = row.get("output", {}).get("context") or {}
        harness = (row.get("harness") or {}).get("files") or {}
        if isinstance(outputs, dict):
            targets, references = list(outputs), outputs
        else:
            targets, references = list(outputs), {}
    else:  # agentic: prompt, context, patch, harness
        prompt, context = row["prompt"], row.get("context") or {}
        harness = row.get("harness") or {}
        patches = row.get("patch") or {}
        targets = list(patches)
        references = {p: apply_hunks(context.get(p, ""), d) for p, d in patches.items()}
    if not harness or not targets or "src/.env" not in harness:
        return None
    env = parse_env(harness["src/.env"])
    sources = env.get("VERILOG_SOURCES", "").split()
    target = next((t for t in targets if any(s.endswith(t) for s in sources)), targets[0])
    return RTLProblem(
        id=row["id"],
        categories=tuple(row.get("categories", ())),
        prompt=prompt,
        context={k: v for k, v in context.items() if k != target},
        target=target,
        reference=references.get(target),
        harness=dict(harness),
        env=env,
    )


def load_cvdp(paths: Sequence[str | os.PathLike], *, errors: list[str] | None = None,
              ) -> list[RTLProblem]:
    """Problems from CVDP JSONL files or directories of them; rows without a harness are skipped.

    Where the same id appears with and without solutions, the row carrying the reference wins.
    A malformed row raises ValueError naming file:line, or, given an `errors` list, is
    described there and skipped (so one bad row does not stop a run over the rest).
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(path.glob("*.jsonl"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} not found: pass CVDP .jsonl files or a directory holding them")
    problems: dict[str, RTLProblem] = {}
    for file in files:
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                problem = _problem_from_row(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                why = f"{type(e).__name__}: {e}" if not isinstance(e, KeyError) else f"missing key {e}"
                message = (f"{file}:{number}: malformed CVDP row ({why}); a code-generation row needs "
                           "id, input.prompt (or prompt), output.context (or patch) and harness")
                if errors is None:
                    raise ValueError(message) from e
                errors.append(message)
                continue
            if problem and (problem.id not in problems or problem.reference is not None):
                problems[problem.id] = problem
    return list(problems.values())


def default_cvdp_paths(data_dir: str | os.PathLike | None = None) -> list[Path]:
    from jaxrl.eval.tasks import default_data_dir

    return [Path(data_dir or default_data_dir()) / "cvdp", OWN_PROBLEMS]


_CODE_BLOCK = re.compile(r"```[ \t]*(?:verilog|systemverilog|sv|v)?[ \t]*\n(.*?)```", re.S | re.I)


def extract_verilog(answer: str) -> str | None:
    """The code block of an answer (the first one holding a module), or None: the format stage."""
    blocks = _CODE_BLOCK.findall(answer)
    for block in blocks:
        if re.search(r"\bmodule\b", block):
            return block
    if blocks:
        return blocks[0]
    bare = re.search(r"\bmodule\b.*\bendmodule\b", answer, re.S)
    return bare.group(0) if bare else None


class VerilogGrader:
    """Grades answers to RTL problems: scratch dir, sandboxed Icarus + cocotb, shaped reward.

    harness="runner" (default) calls `cocotb_tools.runner` with the `.env` settings: the tests
    stage is the fraction of cocotb tests passed, a fine-grained RL reward. harness="pytest" runs
    the problem's own `src/test_runner.py` under pytest as CVDP does (parameter sweeps, custom
    build args included); its tests stage counts pytest cases. It needs a test_runner.py.
    """

    def __init__(
        self,
        sandbox: Sandbox | None = None,
        limits: Limits = RTL_LIMITS,
        weights: RewardWeights = RewardWeights(),
        workers: int | None = None,
        cache: bool = True,
        harness: str = "runner",
    ):
        if harness not in ("runner", "pytest"):
            raise ValueError(f"harness must be 'runner' or 'pytest', got {harness!r}")
        self.sandbox = sandbox or Sandbox("bwrap")
        self.limits = limits
        self.weights = weights
        self.harness = harness
        self.cache = ResultCache() if cache else None
        self._pool = ThreadPoolExecutor(workers or default_workers(), thread_name_prefix="rtl")

    def grade(self, problem: RTLProblem, answer: str, *, raw_code: bool = False) -> RTLResult:
        """`answer` is a model's reply (a code block is extracted) or, with raw_code, the file itself."""
        code = answer if raw_code else extract_verilog(answer)
        if code is None:
            return RTLResult(problem.id, 0.0, False, False, 0, 0, "format: no code block found")
        if not problem.gradable:
            return RTLResult(problem.id, 0.0, True, False, 0, 0, problem.ungradable_reason)
        if self.harness == "pytest" and "src/test_runner.py" not in problem.harness:
            return RTLResult(problem.id, 0.0, True, False, 0, 0, "not gradable: harness has no src/test_runner.py")
        key = ResultCache.key(problem.id, self.harness, code, json.dumps(problem.harness, sort_keys=True))
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return dataclasses.replace(hit, cached=True)
        result = self._run(problem, code)
        if self.cache is not None:
            self.cache.put(key, result)
        return result

    def grade_many(self, problems: Sequence[RTLProblem], answers: Sequence[str], *, raw_code=False):
        if len(problems) != len(answers):
            raise ValueError(f"got {len(problems)} problems but {len(answers)} answers")
        return list(self._pool.map(lambda p, a: self.grade(p, a, raw_code=raw_code), problems, answers))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _reward(self, syntax_ok: bool, fraction: float) -> float:
        w = self.weights
        return w.format + w.syntax * syntax_ok + w.tests * fraction

    def _run(self, problem: RTLProblem, code: str) -> RTLResult:
        with scratch_dir("jaxrl-rtl-") as scratch:
            root = Path(scratch)
            code_dir, src_dir = root / "code", root / "src"

            def remap(value: str) -> str:  # docker layout (/code, /src) -> our scratch dir
                return re.sub(r"(?<![\w/])/(code|src)(?=/|\b)", lambda m: str(root / m.group(1)), value)

            for rel, text in {**problem.context, problem.target: code}.items():
                _write(code_dir / rel, text)
            for rel, text in problem.harness.items():
                if rel.startswith("src/"):
                    _write(root / rel, remap(text) if self.harness == "pytest" else text)
            env = {k: remap(v) for k, v in problem.env.items()}
            nonce = secrets.token_hex(16)
            job = {
                "nonce": nonce,
                "sources": env.get("VERILOG_SOURCES", "").split(),
                "toplevel": env["TOPLEVEL"],
                "module": env["MODULE"],
                "test_dir": str(src_dir),
                "build_dir": str(code_dir / "rundir" / "sim_build"),
                "run_dir": str(code_dir / "rundir"),
                "harness": self.harness,
                "env": env,
            }
            os.chmod(root, 0o777)
            run = self.sandbox.run(
                [sys.executable, "-I", str(DRIVER)],
                stdin=json.dumps(job).encode(),
                limits=self.limits,
                workdir=root,
                env={"PYTHONPATH": str(src_dir), "PYTHONNOUSERSITE": "1"},
            )
        stages = _stages(run.output.replace(f"{root}/code/", "").replace(str(root), "."), nonce)
        syntax, tests = stages.get("syntax"), stages.get("tests")
        if syntax is None:
            reason = f"driver failed before compiling: {run.failure or run.output.strip()[-500:]}"
            return RTLResult(problem.id, self._reward(False, 0.0), True, False, 0, 0, reason, run.wall_seconds)
        if not syntax["ok"]:
            return RTLResult(
                problem.id, self._reward(False, 0.0), True, False, 0, 0,
                "syntax: " + syntax["log"].strip()[-500:], run.wall_seconds, log=syntax["log"].strip(),
            )
        if tests is None:
            reason = f"tests: simulation did not finish ({run.failure or 'no result'})"
            return RTLResult(problem.id, self._reward(True, 0.0), True, True, 0, 0, reason, run.wall_seconds)
        n, failed = int(tests["tests"]), int(tests["failed"])
        fraction = (n - failed) / n if n else 0.0
        if n == 0:
            reason = "tests: no cocotb test ran: " + tests.get("log", "")[-500:]
        elif failed:
            unit = "pytest cases" if self.harness == "pytest" else "cocotb tests"
            reason = f"tests: {failed}/{n} {unit} failed"
        else:
            reason = "passed"
        return RTLResult(problem.id, self._reward(True, fraction), True, True, n, failed, reason,
                         run.wall_seconds, log=tests.get("log", "") if failed or not n else "")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _stages(output: str, nonce: str) -> dict[str, dict]:
    stages = {}
    for line in output.splitlines():
        if line.startswith(nonce):
            try:
                record = json.loads(line[len(nonce) :])
            except json.JSONDecodeError:
                continue
            stages[record.pop("stage")] = record
    return stages


def grade_rtl_batch(
    answers: Sequence[str], problems: Sequence[RTLProblem], grader: VerilogGrader
) -> np.ndarray:
    """Host-side RL reward for RTL: the shaped reward per answer (float32)."""
    return np.array([r.reward for r in grader.grade_many(problems, answers)], np.float32)
