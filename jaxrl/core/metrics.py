"""Metrics: `metrics.jsonl` always, wandb when asked, and a PNG of the curves at the end.

Only process 0 writes. On resume the JSONL is cut back to the restored step, so every logged
step appears exactly once however often a run was interrupted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import jax
import numpy as np


class MetricsWriter:
    def __init__(self, run_dir: str | Path, *, wandb_mode: str = "disabled",
                 wandb_project: str = "jaxrl", config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = jax.process_index() == 0
        self.wandb = None
        if self.enabled and wandb_mode != "disabled":
            import wandb

            run_id = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
            self.wandb = wandb.init(project=wandb_project, mode=wandb_mode, dir=str(run_dir),
                                    name=Path(run_dir).name, id=run_id, config=config,
                                    resume="allow")

    def truncate_after(self, step: int):
        """Drop rows logged after `step` (they belong to work the resumed run will redo)."""
        if not (self.enabled and self.path.exists()):
            return
        rows = [r for r in read_jsonl(self.path, drop_torn_tail=True) if r.get("step", -1) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(step))

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def _plain(v):
    v = np.asarray(v) if isinstance(v, (jax.Array, np.ndarray, np.generic)) else v
    if isinstance(v, np.ndarray):
        v = v.item() if v.size == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf
    return v


def read_jsonl(path: str | Path, *, drop_torn_tail: bool = False) -> list[dict]:
    """Rows of a JSONL file. `drop_torn_tail`: a last line cut short by a crash mid-write is
    dropped (with a note) instead of failing; a bad line anywhere else is always an error."""
    with open(path) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if drop_torn_tail and i == len(lines) - 1:
                print(f"[jaxrl] {path}:{n}: dropping a torn last line (a crash mid-write).",
                      flush=True)
                break
            raise ValueError(f"{path}:{n}: not a JSON row ({e}); fix or delete that line.") from None
    return rows


# Curves a reader looks at first; the rest follow alphabetically while panels remain.
MAIN_CURVES = ("loss", "ppl", "reward", "return", "sentiment", "pass@")


def plot_metrics(jsonl: str | Path, png: str | Path, keys: list[str] | None = None, max_panels=8):
    """One panel per numeric metric (or per `keys`), step on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(jsonl)
    if keys is None:
        numeric = {k for r in rows for k, v in r.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        keys = sorted(numeric, key=lambda k: (not any(w in k for w in MAIN_CURVES), k))
    keys = keys[:max_panels]
    if not keys:
        return None
    cols = min(4, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png
