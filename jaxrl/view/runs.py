"""Reading run directories for the viewer: discovery, status, config, metrics, evaluations.

Everything here reads files only and turns bad input (a missing dir, malformed YAML, a torn
metrics line) into a message for the page. Paths from a request go through `safe_path`, which
refuses anything that would leave the run directory.
"""

from __future__ import annotations

import json
import os
import time
from array import array
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

RUN_FILES = ("config.yaml", "metrics.jsonl", "result.json", "summary.json")
SKIP_DIRS = {"checkpoints", "replays", "hf", "wandb", ".git", "__pycache__"}
RUNNING_WITHIN_S = 120  # a run whose files changed this recently counts as running
MAX_JSON_BYTES = 5 << 20


class Refused(ValueError):
    """A request for a path outside the run directory."""


@dataclass(frozen=True)
class Run:
    id: str
    path: Path
    error: str | None = None  # set when the directory cannot be shown


def discover(args: list[str | Path], max_depth: int = 3) -> dict[str, Run]:
    """Every run dir given, or found under a given parent (a dir holding any of RUN_FILES)."""
    runs: dict[str, Run] = {}

    def add(name: str, path: Path, error: str | None = None):
        key, n = name, 2
        while key in runs:
            key, n = f"{name}#{n}", n + 1
        runs[key] = Run(key, path, error)

    for arg in map(Path, args):
        name = arg.name or str(arg)
        if not arg.exists():
            add(name, arg, f"directory not found: {arg}")
        elif not arg.is_dir():
            add(name, arg, f"not a directory: {arg}")
        elif is_run_dir(arg):
            add(name, arg)
        else:
            found = _find_runs(arg, max_depth)
            for path in found:
                add(PurePosixPath(arg.name, *path.relative_to(arg).parts).as_posix(), path)
            if not found:
                add(name, arg, f"no run files ({', '.join(RUN_FILES)}) in {arg} or below it")
    return runs


def is_run_dir(path: Path) -> bool:
    return any((path / f).is_file() for f in RUN_FILES)


def _find_runs(root: Path, max_depth: int) -> list[Path]:
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and depth < max_depth)
        if here != root and is_run_dir(here):
            found.append(here)
            dirnames[:] = []
    return found


def safe_path(run: Run, rel: str) -> Path:
    """`rel` inside `run.path`, or Refused: no absolute paths, no `..`, no symlink escapes."""
    if not rel or "\\" in rel or "\0" in rel or rel.startswith("/") or ":" in rel.split("/")[0]:
        raise Refused(f"refused path {rel!r}: give a path relative to the run directory")
    if ".." in PurePosixPath(rel).parts:
        raise Refused(f"refused path {rel!r}: '..' is not allowed")
    root = run.path.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise Refused(f"refused path {rel!r}: it leads outside the run directory")
    return path


def read_config(run: Run) -> tuple[dict | None, str | None]:
    """(config, error) from config.yaml."""
    path = run.path / "config.yaml"
    if not path.is_file():
        return None, None  # an eval-only run dir may have none
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        return None, f"config.yaml is not valid YAML: {str(e).splitlines()[0]}"
    if not isinstance(data, dict):
        return None, "config.yaml is not a mapping of sections"
    return data, None


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(a: dict, b: dict) -> list[dict]:
    """Only the (dotted) keys whose values differ; a key missing on one side counts."""
    fa, fb = flatten(a), flatten(b)
    missing = object()
    rows = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, missing), fb.get(key, missing)
        if va != vb:
            rows.append({"key": key, "a": None if va is missing else va,
                         "b": None if vb is missing else vb,
                         "only": "b" if va is missing else "a" if vb is missing else None})
    return rows


def read_metrics(run: Run, offset: int = 0, line: int = 0, file_id: str = "") -> dict:
    """Rows of metrics.jsonl from byte `offset` on (for live refresh).

    An incomplete last line (a run mid-write) is left for the next call; a malformed line
    elsewhere is skipped with a warning. `reset` says the file was rewritten (a resumed run
    truncates it), so the caller must drop what it had and read from 0.
    """
    path = run.path / "metrics.jsonl"
    if not path.is_file():
        return {"rows": [], "offset": 0, "line": 0, "file_id": "", "reset": False,
                "warnings": ["no metrics.jsonl"]}
    st = path.stat()
    this_id = f"{st.st_ino}"
    reset = bool(file_id) and (file_id != this_id or st.st_size < offset)
    if reset or not file_id:
        offset, line = 0, 0
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    rows, warnings = [], []
    pieces = data.split(b"\n")
    tail = pieces.pop()  # b"" when the data ends with a newline
    for piece in pieces:
        line += 1
        offset += len(piece) + 1
        if not piece.strip():
            continue
        try:
            row = json.loads(piece)
        except (json.JSONDecodeError, UnicodeDecodeError):
            warnings.append(f"metrics.jsonl line {line} is not valid JSON (a torn write?); skipped")
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
        else:
            warnings.append(f"metrics.jsonl line {line} has no numeric 'step'; skipped")
    if tail.strip():
        warnings.append(f"metrics.jsonl line {line + 1} is incomplete (still being written, or "
                        "torn by a crash); it is shown once complete")
    return {"rows": rows, "offset": offset, "line": line, "file_id": this_id, "reset": reset,
            "warnings": warnings}


def _checkpoint_steps(run: Run) -> list[int]:
    ckpt = run.path / "checkpoints"
    if not ckpt.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt.iterdir() if p.is_dir() and p.name.isdigit())


def _last_step(run: Run) -> int | None:
    rows = read_metrics(run)["rows"]
    return int(rows[-1]["step"]) if rows else None


def status(run: Run) -> tuple[str, str]:
    """(status, why) from the files alone.

    finished: result.json exists. running: a file changed in the last RUNNING_WITHIN_S s.
    preempted: a checkpoint at (or past) the last logged step, as SIGTERM leaves. failed: none
    of these (a crash or a NaN stop leaves metrics past the last checkpoint).
    """
    if run.error:
        return "bad", run.error
    if (run.path / "result.json").is_file():
        return "finished", "result.json written"
    files = [run.path / f for f in ("metrics.jsonl", "config.yaml")]
    ckpt = run.path / "checkpoints"
    if ckpt.is_dir():
        files.append(ckpt)
    newest = max((p.stat().st_mtime for p in files if p.exists()), default=0.0)
    if time.time() - newest < RUNNING_WITHIN_S:
        return "running", f"files changed {time.time() - newest:.0f} s ago"
    steps, last = _checkpoint_steps(run), _last_step(run)
    if steps and (last is None or steps[-1] >= last):
        return "preempted", f"stopped at checkpoint step {steps[-1]} without result.json"
    return "failed", ("stopped without result.json" +
                      (f"; last checkpoint {steps[-1]}, last logged step {last}" if steps else
                       "; no checkpoint"))


def summary(run: Run) -> dict:
    """One row of the Runs page."""
    st, why = status(run)
    out = {"id": run.id, "path": str(run.path), "status": st, "why": why, "error": run.error}
    if run.error:
        return out
    config, config_error = read_config(run)
    metrics = read_metrics(run)
    last: dict = {}
    for row in metrics["rows"]:  # eval rows share a step with train rows: merge the latest
        last.update(row)
    out.update(config=config, config_error=config_error, recipe=(config or {}).get("recipe"),
               last_metrics=last,
               warnings=metrics["warnings"] if (run.path / "metrics.jsonl").is_file() else [],
               checkpoints=_checkpoint_steps(run), replays=list_replays(run),
               has_samples=(run.path / "samples.jsonl").is_file())
    return out


def list_json(run: Run) -> list[dict]:
    """result.json, summary.json and other evaluation JSONs (top level and eval*/ dirs)."""
    paths = sorted(run.path.glob("*.json")) + sorted(run.path.glob("eval*/**/*.json"))
    out = []
    for p in paths:
        rel = p.relative_to(run.path).as_posix()
        if p.stat().st_size > MAX_JSON_BYTES:
            out.append({"path": rel, "error": f"larger than {MAX_JSON_BYTES >> 20} MB; not shown"})
            continue
        try:
            out.append({"path": rel, "data": json.loads(p.read_text())})
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            out.append({"path": rel, "error": f"not valid JSON: {e}"})
    return out


def search_samples(run: Run, q: str = "", offset: int = 0, limit: int = 50) -> dict:
    """Rows of samples.jsonl whose text contains `q` (case-insensitive), one page of them."""
    path = run.path / "samples.jsonl"
    if not path.is_file():
        return {"rows": [], "total": 0, "warnings": ["no samples.jsonl"]}
    q = q.lower()
    rows, total, warnings = [], 0, []
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, text in enumerate(f, 1):
            if not text.strip() or (q and q not in text.lower()):
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                warnings.append(f"samples.jsonl line {n} is not valid JSON; skipped")
                continue
            total += 1
            if offset < total <= offset + limit:
                rows.append(row if isinstance(row, dict) else {"value": row})
    return {"rows": rows, "total": total, "warnings": warnings[:20]}


def list_replays(run: Run) -> list[str]:
    folder = run.path / "replays"
    if not folder.is_dir():
        return []
    return sorted(p.relative_to(run.path).as_posix() for p in folder.rglob("*.jsonl"))


class LineIndex:
    """Byte offsets of every line of a file, so any page of a long replay is one seek away.

    Built once per (file, size, mtime) by scanning for newlines; nothing is parsed or kept but
    the offsets (8 bytes a line).
    """

    def __init__(self):
        self._cache: dict[Path, tuple[tuple, array]] = {}

    def offsets(self, path: Path) -> array:
        st = path.stat()
        key = (st.st_size, st.st_mtime_ns)
        hit = self._cache.get(path)
        if hit and hit[0] == key:
            return hit[1]
        offsets = array("q", [0])
        with path.open("rb") as f:
            pos = 0
            while chunk := f.read(1 << 20):
                start = 0
                while (i := chunk.find(b"\n", start)) != -1:
                    offsets.append(pos + i + 1)
                    start = i + 1
                pos += len(chunk)
        if offsets[-1] == pos:  # a final newline does not start a line
            offsets.pop()
        self._cache[path] = (key, offsets)
        return offsets

    def lines(self, path: Path, start: int, count: int) -> list[bytes]:
        offsets = self.offsets(path)
        stop = min(start + count, len(offsets))
        if start >= stop:
            return []
        with path.open("rb") as f:
            f.seek(offsets[start])
            end = offsets[stop] if stop < len(offsets) else None
            data = f.read() if end is None else f.read(end - offsets[start])
        return data.splitlines()[: stop - start]
