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
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl.core.config import ConfigError
from jaxrl.envs.text import chunk_ttt as ct
from jaxrl.recipes import chunk_ttt as train_recipe

SINGLE_PROCESS = "the evaluation runs every method on one host and writes one report"


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
    seed: int = 1000

    def validate(self):
        if self.calibration_docs < 1 or self.bisection_steps < 1:
            raise ConfigError("eval.calibration_docs and eval.bisection_steps must be >= 1.")
        if self.policy_kappa < 0:
            raise ConfigError(f"eval.policy_kappa must be >= 0 (0: no calibration), got {self.policy_kappa}.")


@dataclasses.dataclass
class Config(train_recipe.Config):
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


def update_action(rho: float, budget: float) -> tuple[int, float]:
    """The single-k rules' action and rate: the smallest k whose every-chunk cost reaches B,
    updated on a fraction u* = B / (rho k) of chunks (1 when even U4 every chunk is under B)."""
    for action, k in enumerate(ct.STEPS[1:], start=1):
        if rho * k >= budget:
            return action, budget / (rho * k)
    return len(ct.STEPS) - 1, 1.0


def run(cfg: Config) -> dict:
    start = time.perf_counter()
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
        action, rate = update_action(rho, budget)
        rows = {}
        probs = np.zeros(len(ct.STEPS), np.float32)
        probs[0], probs[action] = 1.0 - rate, rate
        rows["random"] = evaluate("random", ttt, ct.act_random,
                                  jnp.log(jnp.maximum(jnp.asarray(probs), 1e-12)), budget=budget)
        every = max(int(round(1.0 / rate)), 1)
        rows["periodic"] = evaluate("periodic", ttt, ct.act_periodic,
                                    (jnp.int32(every), jnp.int32(action)), budget=budget)
        for feature in ("loss", "entropy", "surprise"):
            values = calib_obs[:, ct.FEATURES.index(feature)]
            tau = float(np.quantile(values, 1.0 - rate)) if rate < 1 else float(values.min() - 1)
            kappa = cfg.eval.gate_kappa * float(values.std() + 1e-6)
            p0 = (jnp.float32(tau), jnp.float32(kappa), jnp.float32(rate), jnp.int32(action))
            rows[f"{feature}_gate"] = evaluate(f"{feature}_gate", ttt, ct.threshold_gate(feature),
                                               p0, budget=budget)
        plan = ct.top_q_plan(gains, np.asarray(docs.valid)[:, 1:], budget / rho, 1)
        rows["top_q_oracle"] = evaluate("top_q_oracle", ttt, ct.act_schedule, jnp.int32(0),
                                        jnp.asarray(plan), budget=budget)
        rows["greedy_oracle"] = greedy_oracle(evaluate, ttt, budget, cfg.eval.bisection_steps)
        policy_file = Path(cfg.eval.policy_dir) / f"B{budget:g}" / "policy.msgpack"
        if cfg.eval.policy_dir and policy_file.is_file():
            ppo, params, obs_stats, _ = train_recipe.load_policy(
                cfg, fast_lm, rho, budget, docs.num_chunks, policy_file)
            own = ct.ChunkTTT(fast_lm, rho, budget, cfg.reward_mode)
            rows["policy"] = evaluate("policy", own, train_recipe.policy_act(ppo),
                                      (params, obs_stats), budget=budget)
            tracker = ct.Calibrated(policy=(params, obs_stats), mu=jnp.float32(0.0),
                                    kappa=jnp.float32(cfg.eval.policy_kappa),
                                    budget=jnp.float32(budget))
            rows["policy_calibrated"] = evaluate(
                "policy_calibrated", own, train_recipe.policy_calibrated_act(ppo), tracker,
                budget=budget)
        oracle = rows["greedy_oracle"]["ce"]
        for row in rows.values():
            row["oracle_recovery"] = ((ce_skip - row["ce"]) / (ce_skip - oracle)
                                      if ce_skip > oracle else float("nan"))
        results[f"{budget:g}"] = rows
        if jax.process_index() == 0:
            print(f"[chunk_ttt_eval] B={budget:g}: " + ", ".join(
                f"{k} {v['ce']:.4f}@{v['cost']:.2f}" for k, v in rows.items()), flush=True)

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
    return {"pareto": str(out_dir / "pareto.json"), "ce_skip": ce_skip,
            "seconds": report["seconds"]}


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
             f"{'B':>5} {'method':<18}{'CE':>9}{'cost':>7}{'|J-B|/B':>9}{'over':>6}{'recov':>7}"]
    for budget, rows in report["budgets"].items():
        for name, r in rows.items():
            lines.append(f"{budget:>5} {name:<18}{r['ce']:>9.4f}{r['cost']:>7.2f}"
                         f"{r['budget_error']:>9.2f}{r['over_budget_docs']:>6.2f}{r['oracle_recovery']:>7.2f}")
    return "\n".join(lines)
