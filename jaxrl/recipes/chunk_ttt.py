"""Chunk-level test-time training: PPO-Lagrangian policies choosing SKIP / U1 / U2 / U4 per chunk, one per budget.

A frozen GPT-2 (`base`, e.g. from configs/sft_gpt2_stdlib.yaml) reads source files chunk by
chunk; fast weights (`fast`) adapt at test time; before each chunk the policy decides how many
inner steps to spend on the previous chunk. A PID-Lagrangian multiplier (`pid`) holds the mean
extra compute per chunk to each budget in `budgets`; each budget trains its own policy in
`<run.dir>/B<budget>` (the shared loop: checkpoints, metrics, resume) and writes
`policy.msgpack` for `chunk_ttt_eval`. `loop.steps` counts PPO updates per budget.

Documents: `.py` files under `data.root` (default: this Python's standard library), split by
top-level package (`data.eval_packages` are held out, the policies train on
`data.train_packages`), tokenised with the base model's tokenizer. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import json
import sysconfig
import time
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization, struct

from jaxrl.algorithms import pid_lagrangian
from jaxrl.algorithms.pid_lagrangian import PIDConfig, PIDState
from jaxrl.algorithms.ppo import PPO, PPOConfig, PPOState, RunningStats
from jaxrl.core.config import ConfigError, RecipeConfig
from jaxrl.core.loop import train
from jaxrl.core.mesh import check_batch_size, make_mesh, replicated
from jaxrl.core.step import compile_step, sharded_init
from jaxrl.data.tokenizer import Tokenizer
from jaxrl.envs.text import chunk_ttt as ct
from jaxrl.models import fast_weights, gpt2
from jaxrl.models.fast_weights import FastConfig
from jaxrl.models.policy import MASKED_LOGIT, MLP, ActorCritic
from jaxrl.recipes.ppo import PolicyConfig

SINGLE_PROCESS = ("the document pool is built on this host and placed as one replicated array, "
                  "and per-budget policies are written by this process; run it on one process")


@dataclasses.dataclass
class ChunkDataConfig:
    """Which files are documents, how they are chunked, and the train / eval split."""

    root: str = "{stdlib}"  # `{stdlib}`: this Python's standard library
    pattern: str = "**/*.py"
    exclude: list[str] = dataclasses.field(default_factory=lambda: [
        "site-packages/*", "test/*", "*/tests/*", "*/idle_test/*", "config-*", "_sysconfigdata*"])
    eval_packages: list[str] = dataclasses.field(default_factory=lambda: ["[t-z]*"])  # fnmatch on the top-level name
    # The train split (policies, gate calibration): top-level names matching these and not
    # held out. Keep them out of the base model's SFT too: on files the base has read, its
    # fast weights gain less and U4 overshoots (stdlib base: U4's gain from phi_0 -0.008 nats
    # on a..f, which it read, +0.067 on u..z, which it did not), so a policy trained there
    # learns the wrong price of an update for the unseen test files.
    train_packages: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    tokenizer: str = "runs/tokenizer_stdlib"  # "gpt2" or a trained tokenizer directory
    chunk: int = 64  # C tokens per chunk
    max_chunks: int = 16  # T_max: longer documents are cut (bootstrapped, not terminal)
    train_docs: int = 128  # the first N usable documents of each split (sorted by path)
    eval_docs: int = 48
    drop_short: bool = True  # skip documents shorter than two chunks; false: an error

    def validate(self):
        if self.chunk < 2 or self.max_chunks < 2:
            raise ConfigError(f"data.chunk and data.max_chunks must be >= 2, got {self.chunk}, {self.max_chunks}.")
        if self.train_docs < 1 or self.eval_docs < 1:
            raise ConfigError("data.train_docs and data.eval_docs must be >= 1.")


def _default_ppo() -> PPOConfig:
    return PPOConfig(num_envs=32, rollout_steps=15, epochs=4, minibatches=4, lr=3e-4,
                     anneal_lr=False, max_grad_norm=1.0, ent_coef=0.01, clip_value=False,
                     normalize_observations=True, target_kl=0.02, reward_scale=10.0,
                     lagrangian=True)


@dataclasses.dataclass
class Config(RecipeConfig):
    base: str = "runs/sft_gpt2_stdlib/hf"  # a Hugging Face GPT-2 directory
    data: ChunkDataConfig = dataclasses.field(default_factory=ChunkDataConfig)
    fast: FastConfig = dataclasses.field(default_factory=FastConfig)
    rho: float = 0.0  # extra forward-equivalents per inner step; 0: measured from XLA's FLOPs
    reward_mode: Literal["anchored", "counterfactual"] = "anchored"
    budgets: list[float] = dataclasses.field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    policy: PolicyConfig = dataclasses.field(default_factory=PolicyConfig)
    ppo: PPOConfig = dataclasses.field(default_factory=_default_ppo)
    pid: PIDConfig = dataclasses.field(default_factory=PIDConfig)  # pid.budget is set per budget
    # A budget below this offers the policy SKIP and U1 only. U1 gains the most CE per unit of
    # cost from the start weights, and at B = 0.125 the mixes with U2 / U4 the policy learned
    # lost to U1 on a fraction of chunks; without them it beats that curve (docs/chunk_ttt.md).
    # 0: all four actions at every budget. Saved with each policy, so evaluation uses its own.
    u1_only_below: float = 0.25

    def validate(self):
        if not self.budgets:
            raise ConfigError("budgets is empty; list at least one, e.g. [1.0].")
        if self.u1_only_below < 0:
            raise ConfigError(f"u1_only_below must be >= 0 (0: every action at every budget), "
                              f"got {self.u1_only_below}.")
        for b in self.budgets:
            check_budget(b)
        if self.rho < 0:
            raise ConfigError(f"rho must be >= 0 (0: measure it), got {self.rho}.")
        if not self.ppo.lagrangian:
            raise ConfigError("ppo.lagrangian must be true: the budget is held by the "
                              "Lagrangian loss and its PID multiplier.")


def check_budget(budget: float):
    """Budgets are mean extra forward-equivalents per chunk; SKIP, the cheapest action, costs 0."""
    if budget <= 0:
        raise ConfigError(
            f"budget {budget} is below the cheapest action: SKIP costs 0 extra forward-"
            "equivalents, and every update costs more, so only B > 0 leaves a choice to "
            "learn. Use a positive budget such as 1.0 (B = rho is one U1 per chunk).")


# ---------------------------------------------------------------------------------------------
# Base model, documents, cost model (shared with chunk_ttt_eval)


def load_base(cfg: Config) -> tuple[gpt2.GPT2, Tokenizer]:
    """The frozen GPT-2 and the tokenizer its vocabulary must match (checked before compile)."""
    path = Path(cfg.base)
    if not (path / "config.json").is_file():
        raise ConfigError(f"base={cfg.base!r} is not a Hugging Face GPT-2 directory; train one "
                          "with configs/sft_gpt2_stdlib.yaml (-> runs/sft_gpt2_stdlib/hf).")
    tokenizer = Tokenizer.from_spec(cfg.data.tokenizer)
    hf_vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    if hf_vocab + 1 != tokenizer.vocab_size:
        raise ConfigError(
            f"base={cfg.base!r} has a vocabulary of {hf_vocab} ids (+ pad) but data.tokenizer="
            f"{cfg.data.tokenizer!r} has {tokenizer.vocab_size}: the model would read other "
            "tokens than it was trained on. Use the tokenizer the base model was trained with.")
    lm = gpt2.from_pretrained(path)
    if 2 * cfg.data.chunk > lm.cfg.n_positions:
        raise ConfigError(f"data.chunk={cfg.data.chunk}: scoring reads 2 chunks = "
                          f"{2 * cfg.data.chunk} tokens, more than the base model's n_positions="
                          f"{lm.cfg.n_positions}; use chunk <= {lm.cfg.n_positions // 2}.")
    return lm, tokenizer


def document_files(data: ChunkDataConfig, split: Literal["train", "eval"]) -> list[Path]:
    root = Path(data.root.replace("{stdlib}", sysconfig.get_paths()["stdlib"])).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.root={data.root!r} ({root}) is not a directory.")
    files = []
    for f in sorted(root.glob(data.pattern)):
        rel = f.relative_to(root).as_posix()
        if not f.is_file() or any(fnmatch.fnmatch(rel, p) for p in data.exclude):
            continue
        top = rel.split("/")[0].removesuffix(".py")
        held_out = any(fnmatch.fnmatch(top, p) for p in data.eval_packages)
        trains = any(fnmatch.fnmatch(top, p) for p in data.train_packages)
        if (held_out if split == "eval" else trains and not held_out):
            files.append(f)
    if not files:
        raise ConfigError(f"no {split} documents under {root} matching {data.pattern!r} "
                          f"(exclude {data.exclude}, eval_packages {data.eval_packages}, "
                          f"train_packages {data.train_packages}).")
    return files


def read_documents(data: ChunkDataConfig, tokenizer: Tokenizer, split, limit: int):
    """The first `limit` usable files of the split -> (token lists, names, UTF-8 bytes of the
    scored chunks 1..T-1, for bits per byte)."""
    docs, names, sizes = [], [], []
    for f in document_files(data, split):
        text = f.read_text(encoding="utf-8", errors="replace")
        ids = tokenizer.encode(text)
        if len(ids) <= data.chunk and data.drop_short:
            continue
        docs.append(ids)
        names.append(str(f))
        sizes.append(len(tokenizer.decode(ids[data.chunk:data.chunk * data.max_chunks]).encode()))
        if len(docs) == limit:
            break
    return docs, names, sizes


def chunk_split(cfg: Config, tokenizer: Tokenizer, split, limit: int):
    """Host side, before any compile: read, tokenise and chunk one split (short documents
    are dropped or, with data.drop_short=false, an error naming the file)."""
    tokens, names, n_bytes = read_documents(cfg.data, tokenizer, split, limit)
    chunks = ct.chunk_tokens(tokens, chunk=cfg.data.chunk, max_chunks=cfg.data.max_chunks,
                             eot_id=tokenizer.eot_id, pad_id=tokenizer.pad_id, names=names)
    return chunks, {"names": names, "bytes": n_bytes}


def build_docs(cfg: Config, lm: gpt2.GPT2, fast_lm, chunks, pad_id: int) -> ct.Docs:
    """Cache the inputs (trunk states for `top`) and the start weights' losses."""
    windows, targets, lengths, cut = chunks
    C = cfg.data.chunk
    if cfg.fast.type == "top":
        graphdef, weights = nnx.split(lm)
        states = jax.jit(lambda w, x: fast_weights.trunk_states(nnx.merge(graphdef, w), x, C))
        flat = windows.reshape(-1, 2 * C)
        inputs = jnp.concatenate([states(weights, flat[s:s + 64]) for s in range(0, len(flat), 64)])
        inputs = inputs.reshape(*windows.shape[:2], C, -1)
    else:
        inputs = jnp.asarray(windows)
    return ct.make_docs(fast_lm, inputs, targets, lengths, cut, pad_id)


def measure_rho(lm: gpt2.GPT2, fast_lm, chunk: int, fast_type: str) -> dict:
    """FLOPs of scoring one chunk from tokens (trunk + fast + head) and of one inner step, as
    XLA counts them; rho = step / score."""
    graphdef, weights = nnx.split(lm)
    tokens = jnp.zeros((2 * chunk,), jnp.int32)
    targets = jnp.zeros((chunk,), jnp.int32)
    mask = jnp.ones((chunk,), jnp.float32)

    def inputs_of(w, x):
        if fast_type == "top":
            return fast_weights.trunk_states(nnx.merge(graphdef, w), x[None], chunk)[0]
        return x

    def score(w, fast, x):
        return fast_lm.score(fast, inputs_of(w, x), targets, mask)[0]

    cached = inputs_of(weights, tokens)

    def step(fast, opt, x):
        return fast_lm.inner_step(fast, opt, x, targets, mask)

    flops = lambda f, *a: float(jax.jit(f).lower(*a).compile().cost_analysis()["flops"])  # noqa: E731
    score_flops = flops(score, weights, fast_lm.fast0, tokens)
    step_flops = flops(step, fast_lm.fast0, fast_lm.tx.init(fast_lm.fast0), cached)
    return {"score_flops": score_flops, "step_flops": step_flops, "rho": step_flops / score_flops}


def setup(cfg: Config, splits: dict[str, int]):
    """-> (fast_lm, rho info, {split: (docs, meta)}); every input check runs before compiling."""
    lm, tokenizer = load_base(cfg)
    chunked = {s: chunk_split(cfg, tokenizer, s, n) for s, n in splits.items()}
    fast_lm = fast_weights.build(lm, cfg.fast, cfg.data.chunk, seed=cfg.run.seed)
    lm = gpt2.from_pretrained(cfg.base)  # `build` consumed the first copy (lora wraps it)
    rho = measure_rho(lm, fast_lm, cfg.data.chunk, cfg.fast.type)
    if cfg.rho:
        rho = {**rho, "measured_rho": rho["rho"], "rho": cfg.rho}
    data = {s: (build_docs(cfg, lm, fast_lm, chunks, tokenizer.pad_id), meta)
            for s, (chunks, meta) in chunked.items()}
    return fast_lm, rho, data


# ---------------------------------------------------------------------------------------------
# Training


def budget_logits(costs, budget: float) -> np.ndarray:
    """Log-probabilities of the maximum-entropy action distribution with mean cost B,
    p(a) ~ exp(-beta c(a)) (beta by bisection; B is capped at 90% of the dearest action)."""
    costs = np.asarray(costs, np.float64)
    target = min(budget, 0.9 * costs.max())

    def dist(beta):
        z = -beta * costs
        p = np.exp(z - z.max())
        return p / p.sum()

    lo, hi = -50.0 / costs.max(), 50.0 / costs.max()  # mean cost falls as beta grows
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if dist(mid) @ costs > target else (lo, mid)
    return np.log(dist((lo + hi) / 2)).astype(np.float32)


class ConstrainedActorCritic(ActorCritic):
    """ActorCritic whose critic has two heads: value[..., 0] = V_R, value[..., 1] = V_C.

    The actor starts at `init_logits` (its head's bias; the kernel is ~0): the maximum-entropy
    policy that already spends the budget, so the PID holds a cost instead of chasing one
    down from the uniform policy's 1.75 rho (at B = 0.5 that chase took the whole run)."""

    def __init__(self, obs_dim: int, num_actions: int, *, hidden, activation: str,
                 init_logits: np.ndarray, allowed: tuple[bool, ...], rngs: nnx.Rngs):
        """`allowed[a]`: the policy may take action a (the others' logits are masked)."""
        super().__init__(obs_dim, num_actions, hidden=hidden, activation=activation, rngs=rngs)
        self.actor.head.bias.value = jnp.asarray(init_logits)
        self.critic = MLP(obs_dim, hidden, 2, activation=activation, head_scale=1.0, rngs=rngs)
        self.allowed = tuple(bool(a) for a in allowed)  # static: part of the graph, not params

    def __call__(self, obs: jax.Array, action_mask: jax.Array | None = None):
        if not all(self.allowed):
            allowed = np.asarray(self.allowed)
            action_mask = allowed if action_mask is None else action_mask & allowed
        return super().__call__(obs, action_mask)

    def value(self, obs: jax.Array) -> jax.Array:
        return self.critic(obs)


def allowed_actions(cfg: Config, budget: float) -> tuple[bool, ...]:
    """The policy's action set at `budget`: SKIP and U1 below `u1_only_below`, else all."""
    return tuple(budget >= cfg.u1_only_below or a in ("SKIP", "U1") for a in ct.ACTIONS)


class TTTTrainState(struct.PyTreeNode):
    ppo: PPOState
    pid: PIDState


def make_ppo(cfg: Config, env: ct.ChunkTTTEnv, docs: ct.Docs | None,
             allowed: tuple[bool, ...] | None = None) -> PPO:
    """`allowed`: the action set (default `allowed_actions` at the env's budget); the start
    logits are the maximum-entropy distribution over it that spends the budget."""
    allowed = allowed_actions(cfg, env.ttt.budget) if allowed is None else tuple(allowed)
    keep = np.asarray(allowed)
    init_logits = np.full(len(keep), MASKED_LOGIT, np.float32)
    init_logits[keep] = budget_logits(np.asarray(env.ttt.costs)[keep], env.ttt.budget)

    def make_model(key):
        return ConstrainedActorCritic(len(ct.FEATURES), len(ct.STEPS),
                                      hidden=tuple(cfg.policy.hidden),
                                      activation=cfg.policy.activation,
                                      init_logits=init_logits, allowed=allowed,
                                      rngs=nnx.Rngs(key))

    return PPO(env, ct.EnvParams(docs), make_model, cfg.ppo, num_updates=cfg.loop.steps)


def train_budget(cfg: Config, fast_lm, rho: float, docs: ct.Docs, budget: float, mesh):
    """Train one policy at `budget` in <run.dir>/B<budget> -> (final state, loop result, dir)."""
    run_dir = Path(cfg.run.dir) / f"B{budget:g}"
    bcfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(run_dir)),
                               pid=dataclasses.replace(cfg.pid, budget=budget))
    env = ct.ChunkTTTEnv(ct.ChunkTTT(fast_lm, rho, budget, cfg.reward_mode), docs.num_chunks)
    init_key, train_key = jax.random.split(jax.random.key(cfg.run.seed))

    def init(docs):
        return TTTTrainState(ppo=make_ppo(bcfg, env, docs).init(init_key),
                             pid=pid_lagrangian.init(bcfg.pid))

    def shardings(abstract, mesh):
        ppo = make_ppo(bcfg, env, None)
        return TTTTrainState(ppo=ppo.state_shardings(abstract.ppo, mesh),
                             pid=jax.tree.map(lambda _: replicated(mesh), abstract.pid))

    def step(state: TTTTrainState, docs, key):
        ppo_state, metrics = make_ppo(bcfg, env, docs).update(
            state.ppo.replace(penalty=state.pid.penalty), key)
        pid = pid_lagrangian.update(state.pid, metrics["cost_per_step"], bcfg.pid)
        metrics.update(penalty_next=pid.penalty, budget_error=jnp.abs(
            metrics["cost_per_step"] - budget) / budget)
        return state.replace(ppo=ppo_state, pid=pid), metrics

    placed = jax.device_put(docs, replicated(mesh))
    state0 = sharded_init(init, mesh, placed, shardings=shardings)
    update = compile_step(step, mesh, state0.shardings, batch_shardings=replicated(mesh))
    result = train(bcfg, state=state0, step_fn=update, key=train_key,
                   batches=itertools.repeat(placed))
    state = jax.device_get(result.state)
    save_policy(run_dir / "policy.msgpack", state.ppo.params, state.ppo.obs_stats, state.pid,
                allowed_actions(bcfg, budget))
    return result, run_dir


def save_policy(path: Path, params, obs_stats: RunningStats, pid: PIDState,
                allowed: tuple[bool, ...]):
    """The file `load_policy` reads: the actor-critic's params, the observation normaliser, the
    PID and the action set it was trained with."""
    policy = {"params": params.to_pure_dict(), "obs_stats": serialization.to_state_dict(obs_stats),
              "pid": serialization.to_state_dict(pid),
              "actions": [a for a, ok in zip(ct.ACTIONS, allowed) if ok]}
    path.write_bytes(serialization.msgpack_serialize(policy))


def load_policy(cfg: Config, fast_lm, rho: float, budget: float, num_chunks: int, path: Path):
    """-> (ppo, params, obs_stats, pid state) from the `policy.msgpack` `train_budget` wrote."""
    saved = serialization.msgpack_restore(path.read_bytes())
    names = saved.get("actions", ct.ACTIONS)  # files from before the action set: all four
    env = ct.ChunkTTTEnv(ct.ChunkTTT(fast_lm, rho, budget, cfg.reward_mode), num_chunks)
    ppo = make_ppo(cfg, env, None, allowed=tuple(a in names for a in ct.ACTIONS))
    params = nnx.split(ppo.make_model(jax.random.key(0)))[1]
    params.replace_by_pure_dict(saved["params"])
    obs_stats = serialization.from_state_dict(RunningStats.zeros((len(ct.FEATURES),)), saved["obs_stats"])
    pid = serialization.from_state_dict(
        pid_lagrangian.init(dataclasses.replace(cfg.pid, budget=budget)), saved["pid"])
    return ppo, params, obs_stats, pid


def policy_act(ppo: PPO):
    """The learned policy as an evaluation policy, sampled as trained; p = (params, obs_stats)."""
    def act(ttt, docs, p, obs, state, per, key):
        params, obs_stats = p
        return ppo.act(params, key, obs[None], obs_stats=obs_stats, greedy=False)[0], p
    return act


def policy_calibrated_act(ppo: PPO):
    """The learned policy with test-time budget tracking (`ct.cost_calibrated`): lambda is
    frozen in its weights, so on held-out documents only a test-time multiplier can hold B.
    p = ct.Calibrated(policy=(params, obs_stats), ...); kappa = 0 samples as `policy_act`."""
    def logits(p, obs):
        params, obs_stats = p
        dist, _ = ppo.model(params)(ppo.normalize_obs(obs[None], obs_stats))
        return dist.logits[0]
    return ct.cost_calibrated(logits)


def run(cfg: Config) -> dict:
    check_batch_size(cfg.ppo.num_envs, make_mesh(cfg.mesh), "ppo.num_envs")
    start = time.perf_counter()
    fast_lm, rho, data = setup(cfg, {"train": cfg.data.train_docs})
    docs = data["train"][0]
    mesh = make_mesh(cfg.mesh)
    summary = {"rho": rho, "train_docs": int(docs.targets.shape[0]), "budgets": {}}
    if jax.process_index() == 0:
        print(f"[chunk_ttt] {summary['train_docs']} train documents x {docs.num_chunks} chunks "
              f"of {cfg.data.chunk}; rho = {rho['rho']:.3f}", flush=True)
    for budget in cfg.budgets:
        began = time.perf_counter()
        result, run_dir = train_budget(cfg, fast_lm, rho["rho"], docs, budget, mesh)
        m = result.last_metrics
        summary["budgets"][f"{budget:g}"] = {
            "dir": str(run_dir), "updates": result.step,
            "cost_per_step": m.get("cost_per_step"), "penalty": m.get("penalty_next"),
            "budget_error": m.get("budget_error"), "seconds": round(time.perf_counter() - began, 1)}
        if jax.process_index() == 0:
            print(f"[chunk_ttt] B={budget:g}: {summary['budgets'][f'{budget:g}']}", flush=True)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    return summary
