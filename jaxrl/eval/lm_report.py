"""What each LM evaluation leaves in the run dir: `<eval>.json`, a plot `<eval>.png`, table rows.

Plots use matplotlib's Agg backend (no display needed). `table_rows` turns a result into
markdown rows of `results.md`, one table for the whole run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_json(path: Path, result: dict) -> None:
    path.write_text(json.dumps(result, indent=2))


def plot_zeroshot(results: dict[str, dict], path: Path) -> None:
    """Grouped bars of acc / acc_norm per set, chance marked."""
    plt = _pyplot()
    names = list(results)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    for i, metric in enumerate(("acc", "acc_norm", "acc_norm_tokens")):
        ax.bar(x + (i - 1) * 0.27, [results[n][metric] for n in names], 0.27, label=metric)
    for i, n in enumerate(names):
        ax.hlines(results[n]["chance"], i - 0.45, i + 0.45, colors="k", linestyles=":")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (dotted: chance)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_lambada(result: dict, path: Path) -> None:
    plt = _pyplot()
    rows = result["by_tokens"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([str(r["tokens"]) for r in rows], [r["acc"] for r in rows])
    for i, r in enumerate(rows):
        ax.text(i, r["acc"], f"n={r['items']}", ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("tokens in the last word")
    ax.set_ylabel("greedy accuracy")
    ax.set_title(f"LAMBADA acc {result['acc']:.3f}, ppl {result['ppl']:.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_perplexity(result: dict, path: Path) -> None:
    plt = _pyplot()
    rows = result["by_context"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([f"{r['context_from']}-{r['context_to']}" for r in rows], [r["nll"] for r in rows], marker="o")
    ax.set_xlabel("context tokens before the target")
    ax.set_ylabel("mean NLL (nats)")
    ax.set_title(f"ppl {result['ppl']:.2f} (window {result['window']}, stride {result['stride']})")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_niah(result: dict, path: Path) -> None:
    """One heatmap per needle kind: depth (rows) x context length (columns)."""
    plt = _pyplot()
    kinds = list(result["accuracy"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.8), squeeze=False, layout="constrained")
    for ax, kind in zip(axes[0], kinds):
        grid = result["accuracy"][kind]
        lengths = [str(n) for n in result["lengths"]]
        depths = [str(d) for d in result["depths"]]
        values = np.array([[grid[n][d] for n in lengths] for d in depths])
        image = ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(depths)), depths)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(kind)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist())
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_continual(result: dict, path: Path) -> None:
    """Forgetting curves: CE of each segment after each training stage."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ce = np.array(result["ce"])
    for j, name in enumerate(result["segments"]):
        line = ax.plot(result["stages"], ce[:, j], marker="o", label=name)[0]
        if result["ce_memorize"] is not None:
            ax.plot(result["stages"], np.array(result["ce_memorize"])[:, j], marker="x", linestyle="--",
                    color=line.get_color(), label=f"{name} (memorising)")
    ax.set_ylabel("held-out cross-entropy (nats)")
    ax.set_xlabel("training stage")
    ax.legend()
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table_rows(name: str, result: dict) -> list[str]:
    """`| eval | metric | value |` rows for results.md."""
    def row(metric, value):
        shown = f"{value:.4f}" if isinstance(value, float) else value
        return f"| {name} | {metric} | {shown} |"

    if name == "zeroshot":
        return [row(f"{s} acc / acc_norm / acc_norm_tokens ({r['items']} items)",
                    f"{r['acc']:.4f} / {r['acc_norm']:.4f} / {r['acc_norm_tokens']:.4f}")
                for s, r in result.items()]
    if name == "lambada":
        return [row(f"acc ({result['items']} items)", result["acc"]), row("ppl", result["ppl"])]
    if name == "perplexity":
        return [row(f"ppl ({result['tokens']} tokens, window {result['window']}, stride {result['stride']})",
                    result["ppl"]),
                row("word_ppl", result["word_ppl"]), row("bits_per_byte", result["bits_per_byte"])]
    if name == "niah":
        return [row(f"{kind} mean accuracy (lengths {result['lengths']})", v)
                for kind, v in result["mean"].items()] + [
                row(f"{kind} mean needle gain (nats per answer token)", v)
                for kind, v in result["mean_gain"].items()]
    if name == "continual":
        rows = [row(f"CE {seg} after the last stage (forgetting {result['forgetting'][seg]:+.4f})",
                    result["ce"][-1][j])
                for j, seg in enumerate(result["segments"])]
        if result.get("ce_memorize") is not None:
            rows += [row(f"CE {seg} after the last stage, memorising (forgetting "
                         f"{result['forgetting_memorize'][seg]:+.4f})", result["ce_memorize"][-1][j])
                     for j, seg in enumerate(result["segments"])]
        return rows
    raise KeyError(name)
