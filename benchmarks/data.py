"""LM data throughput and memory: corpus processing, streaming from shards, and the in-memory path.

  python benchmarks/data.py [--out benchmarks/results/data.json] [--seconds 8] [--check]

One corpus for all three: the shared corpora and this Python's standard library, written once
into a temporary directory of 16 JSONL files (one file's text per row; only text the in-memory
reader accepts), so processing has files to spread over its workers.
  process    `python -m jaxrl.data process` over it (normalise, filter, dedup, GPT-2 tokens,
             ArrayRecord shards): input tokens/s = tokens written / wall seconds
  streaming  `load_lm_data` on the shard dir, then batches for `--seconds`
  in_memory  `load_lm_data` on the JSONL directory (today's path: tokenise everything at start), then
             batches for `--seconds`
Each runs in its own process; peak memory is the largest sum of RSS over that process and
its children (sampled every 50 ms), so pool workers count. Startup is the time to the first
batch. The machine is shared with other developers' jobs: numbers are one run, not a median.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil

from machine import check_floors, machine_info  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN, BATCH = 1024, 8


def write_corpus(directory: Path, parts: int = 16) -> int:
    """The shared corpora and the standard library's .py files -> JSONL rows, dealt over `parts` files."""
    from jaxrl.data.sources import default_data_dir

    files = sorted((default_data_dir() / "corpora").rglob("*.txt"))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files += sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    directory.mkdir()
    outs = [(directory / f"part-{k:02d}.jsonl").open("w") for k in range(parts)]
    rows = 0
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            outs[rows % parts].write(json.dumps({"text": text}) + "\n")
            rows += 1
    for f in outs:
        f.close()
    return rows


def child(part: str, corpus: str, shard_dir: str, seconds: float) -> dict:
    """One measurement, in this (fresh) process; prints its JSON."""
    start = time.perf_counter()
    if part == "process":
        from jaxrl.data import corpus as corpus_lib
        from jaxrl.data.manifest import Manifest, SourceConfig

        manifest = Manifest(sources=[SourceConfig(name="bench", path=corpus)])
        stats = corpus_lib.process(manifest, shard_dir, log=lambda *_: None)
        seconds_taken = time.perf_counter() - start
        tokens = sum(stats["tokens"].values())
        return {"seconds": round(seconds_taken, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds_taken),
                "docs_in": stats["total"]["read"], "docs_out": stats["total"]["after_mix"],
                "shards": stats["shards"], "workers": stats["workers"]}
    from jaxrl.data.lm import LMDataConfig, load_lm_data

    cfg = LMDataConfig(path=shard_dir if part == "streaming" else corpus, seq_len=SEQ_LEN, batch_size=BATCH,
                       val_fraction=0.01)
    it = load_lm_data(cfg, process_index=0, process_count=1).train_iterator()
    next(it)
    startup = time.perf_counter() - start
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += 1
    elapsed = time.perf_counter() - t0
    return {"startup_s": round(startup, 2), "batches": n, "tokens_per_s": round(n * BATCH * SEQ_LEN / elapsed)}


def measure(part: str, corpus: Path, shard_dir: Path, seconds: float) -> dict:
    """Run `child(part)` in a subprocess; add its peak RSS (process tree) in MiB."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", part, "--corpus", str(corpus),
                             "--shards", str(shard_dir), "--seconds", str(seconds)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{part} failed (exit {proc.returncode})")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mib": round(peak / 2**20)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data.json"))
    parser.add_argument("--seconds", type=float, default=8.0, help="batch-drawing time per input path")
    parser.add_argument("--child", default="")
    parser.add_argument("--corpus", default="")
    parser.add_argument("--shards", default="")
    parser.add_argument("--check", action="store_true", help="exit 1 when a ratio is below its floor")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.corpus, args.shards, args.seconds)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        corpus, shard_dir = Path(tmp) / "corpus", Path(tmp) / "shards"
        rows = write_corpus(corpus)
        results = {part: measure(part, corpus, shard_dir, args.seconds)
                   for part in ("process", "streaming", "in_memory")}
        corpus_mib = round(sum(f.stat().st_size for f in corpus.iterdir()) / 2**20, 1)
    report = {
        "benchmark": "benchmarks/data.py",
        "corpus": {"documents": rows, "mib": corpus_mib, "what": "shared corpora + Python stdlib .py, one JSONL row per file, 16 files"},
        "seq_len": SEQ_LEN, "batch_size": BATCH,
        **results,
        "machine": machine_info(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        # What streaming buys over tokenising everything at start (higher is better).
        "ratios": {
            "streaming_startup_speedup": round(results["in_memory"]["startup_s"]
                                               / results["streaming"]["startup_s"], 2),
            "streaming_memory_saving": round(results["in_memory"]["peak_rss_mib"]
                                             / results["streaming"]["peak_rss_mib"], 2),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return check_floors("data", report["ratios"], machine=report["machine"]) if args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
