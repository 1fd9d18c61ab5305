"""PPO on a gymnax-style env (Prospector, CartPole-v1, Pendulum-v1, ...); on Prospector, ends with PPO vs the bots.

Discrete action spaces get a categorical policy, Box spaces a Gaussian one; an env with any
other action space is a ConfigError when the env is built.

`loop.steps` counts PPO updates; each consumes `ppo.num_envs * ppo.rollout_steps` env steps.
Evaluation plays `eval.episodes` seeded episodes; on Prospector the three baseline bots play
the very same episodes (same belts, same random draws), and the run ends with a table of
PPO against them.

`run.seeds=N` trains N seeds side by side: the state gains a leading seed axis, one compiled
step updates them all (one after another, `lax.map`), each seed's curves are logged as
`seed<i>/<metric>` beside their mean, and the table gets a row per seed.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl import envs
from jaxrl.algorithms.ppo import PPO, PPOConfig, evaluate
from jaxrl.core.config import ConfigError, RecipeConfig
from jaxrl.core.loop import train
from jaxrl.core.mesh import check_batch_size, make_mesh, replicated
from jaxrl.core.step import compile_step, sharded_init
from jaxrl.models.policy import ACTIVATIONS, ActorCritic

MULTI_SEED = True


@dataclasses.dataclass
class EnvConfig:
    name: str = "prospector"  # "prospector" or a gymnax name such as "CartPole-v1"
    env_impl: Literal["jax", "native", "auto"] = "auto"  # Prospector only: which core steps it
    # The name is checked in `make_env`, not here: listing gymnax's envs imports gymnax, which
    # creates arrays at import, and validators must do no device work.


@dataclasses.dataclass
class PolicyConfig:
    hidden: list[int] = dataclasses.field(default_factory=lambda: [64, 64])
    activation: str = "tanh"

    def validate(self):
        if not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"policy.hidden must list positive widths, got {self.hidden}.")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"policy.activation {self.activation!r} unknown; choose one of "
                              f"{', '.join(ACTIVATIONS)}.")


@dataclasses.dataclass
class EvalConfig:
    episodes: int = 256
    seed: int = 1000  # episode i resets from split(PRNGKey(seed), episodes)[i], for every policy
    greedy: bool = False  # False: sample from the policy (as trained); True: argmax action
    baselines: bool = True  # Prospector: also play the three bots on the same episodes
    # Prospector: replays of the first N evaluation episodes for PPO and the best bot, to
    # watch in `python -m jaxrl.view RUN_DIR` (0: none).
    replays: int = 0

    def validate(self):
        if self.episodes < 1:
            raise ConfigError(f"eval.episodes must be >= 1, got {self.episodes}.")


@dataclasses.dataclass
class Config(RecipeConfig):
    env: EnvConfig = dataclasses.field(default_factory=EnvConfig)
    policy: PolicyConfig = dataclasses.field(default_factory=PolicyConfig)
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


def make_env(cfg: EnvConfig):
    if cfg.name not in envs.registered_envs():
        raise ConfigError(f"env.name {cfg.name!r} unknown; choose one of "
                          f"{', '.join(envs.registered_envs())}.")
    if cfg.name.lower() == "prospector":
        return envs.make(cfg.name, env_impl=cfg.env_impl)
    return envs.make(cfg.name)


def time_limit(env_params) -> int:
    for name in ("max_steps", "max_steps_in_episode"):
        if hasattr(env_params, name):
            return int(getattr(env_params, name))
    raise ValueError("env params have no time limit (max_steps / max_steps_in_episode); "
                     "evaluation needs one to know how long to play")


def make_ppo(cfg: Config) -> PPO:
    env, env_params = make_env(cfg.env)
    obs_dim = int(np.prod(env.observation_shape))
    spec = envs.action_spec(env)

    def make_model(key):
        return ActorCritic(obs_dim, spec.size, continuous=spec.continuous,
                           hidden=tuple(cfg.policy.hidden), activation=cfg.policy.activation,
                           rngs=nnx.Rngs(key))

    return PPO(env, env_params, make_model, cfg.ppo, num_updates=cfg.loop.steps)


def make_evaluator(ppo: PPO, cfg: EvalConfig, mesh, seeds: int = 1):
    """Jitted `state -> returns[episodes]` (`[seeds, episodes]` for a multi-seed state) on the
    fixed evaluation episodes, from the state's params and observation statistics."""
    reset_keys = jax.random.split(jax.random.PRNGKey(cfg.seed), cfg.episodes)
    max_steps = time_limit(ppo.env_params)

    def returns(params, obs_stats):
        act = lambda k, obs, mask: ppo.act(params, k, obs, mask, obs_stats=obs_stats,  # noqa: E731
                                           greedy=cfg.greedy)
        return evaluate(ppo.env, ppo.env_params, act, reset_keys,
                        jax.random.PRNGKey(cfg.seed + 1), max_steps=max_steps)

    def per_seed(params, obs_stats):  # one seed after another, as `seed_axis` trains them
        return jax.lax.map(lambda p: returns(*p), (params, obs_stats))

    compiled = jax.jit(per_seed if seeds > 1 else returns, out_shardings=replicated(mesh))  # every process reads them
    return lambda state: np.asarray(compiled(state.params, state.obs_stats))


def seed_axis(ppo: PPO, seeds: int):
    """init and update over a leading seed axis, and the state's shardings with it (seeds
    unsplit; each seed's envs split over the batch axes as in a one-seed run).

    The seeds run one after another inside the one compiled step (`lax.map`), not batched by
    `vmap`: every op is then the one-seed program's. The vmapped step hung XLA:CPU (jaxlib
    0.10.2) intermittently, in CI (YNN fusions on) and once here (the recipe's test, first
    step, 600 s; no YNN kernels at all); one-seed programs never did (README, run.seeds)."""
    def init(key):
        return jax.lax.map(ppo.init, jax.random.split(key, seeds))

    def update(state, key):
        state, metrics = jax.lax.map(lambda sk: ppo.update(*sk), (state, jax.random.split(key, seeds)))
        curves = {k: v.mean() for k, v in metrics.items()}
        curves.update({f"seed{i}/{k}": v[i] for i in range(seeds) for k, v in metrics.items()})
        return state, curves

    def shardings(state, mesh):
        one = ppo.state_shardings(state, mesh)  # reads the tree structure only
        return jax.tree.map(lambda s: NamedSharding(mesh, P(None, *s.spec)), one)

    return init, update, shardings


def baseline_returns(ppo: PPO, cfg: EvalConfig) -> dict[str, np.ndarray]:
    """The Prospector bots on the evaluation episodes (their own seeded evaluator)."""
    from jaxrl.envs.prospector.bots import BOTS, random_policy
    from jaxrl.envs.prospector.evaluate import evaluate_policy

    policies = {**BOTS, "random": random_policy}
    return {name: evaluate_policy(bot, ppo.env, ppo.env_params, cfg.episodes, cfg.seed)
            for name, bot in policies.items()}


def run(cfg: Config) -> dict:
    ppo = make_ppo(cfg)
    mesh = make_mesh(cfg.mesh)
    check_batch_size(cfg.ppo.num_envs, mesh, "ppo.num_envs")
    seeds = cfg.run.seeds
    init_key, train_key = jax.random.split(jax.random.PRNGKey(cfg.run.seed))
    init_fn, update_fn, shardings = ppo.init, ppo.update, ppo.state_shardings
    if seeds > 1:
        init_fn, update_fn, shardings = seed_axis(ppo, seeds)
    init = sharded_init(lambda: init_fn(init_key), mesh, shardings=shardings)
    update = compile_step(lambda state, batch, key: update_fn(state, key), mesh,
                          init.shardings, batch_shardings=None)
    policy_returns = make_evaluator(ppo, cfg.eval, mesh, seeds)

    def eval_fn(state, step):
        returns = policy_returns(state)
        means = {"eval_return_mean": float(returns.mean()),
                 "eval_return_median": float(np.median(returns))}
        if seeds > 1:
            means.update({f"seed{i}/eval_return_mean": float(r.mean()) for i, r in enumerate(returns)})
        return means

    impl = getattr(ppo.env, "impl", "jax")
    if jax.process_index() == 0:
        print(f"[ppo] env {cfg.env.name} ({impl} core), {cfg.loop.steps} updates x "
              f"{ppo.env_steps_per_update} env steps"
              f"{f' x {seeds} seeds' if seeds > 1 else ''}, {mesh.devices.size} devices in "
              f"{jax.process_count()} process(es)", flush=True)
    start = time.perf_counter()
    result = train(cfg, state=init, step_fn=update, key=train_key, eval_fn=eval_fn)
    seconds = time.perf_counter() - start

    returns = policy_returns(result.state)
    table = {"ppo": returns.reshape(-1)}  # every seed's episodes pooled
    if seeds > 1:
        table.update({f"ppo seed{i}": r for i, r in enumerate(returns)})
    if cfg.eval.baselines and cfg.env.name.lower() == "prospector":
        table.update(baseline_returns(ppo, cfg.eval))
    per_update = ppo.env_steps_per_update * seeds
    env_steps = result.step * per_update
    summary = {
        "env": cfg.env.name,
        "env_impl": impl,
        "updates": result.step,
        "env_steps": env_steps,
        "train_seconds": round(seconds, 1),  # this invocation, incl. compile and evaluations
        **({"seeds": seeds} if seeds > 1 else {}),
        **({"compile_seconds": round(result.timers["compile_s"], 1)} if result.trained_steps else {}),
        # the loop's steps/s clock: no compile, state creation, evaluation or checkpoint time
        **({"env_steps_per_sec": round(result.timed_steps * per_update
                                       / max(result.timers["step_s"], 1e-9))}
           if result.timed_steps else {}),
        "eval_policy": "greedy" if cfg.eval.greedy else "sampled",
        "eval_episodes": cfg.eval.episodes,
        "returns": {name: _stats(r) for name, r in table.items()},
    }
    bots = [n for n in table if not n.startswith("ppo")]
    if bots:
        best_bot = max((n for n in bots if n != "random"), key=lambda n: table[n].mean())
        summary["ppo_minus_best_bot"] = round(float(table["ppo"].mean() - table[best_bot].mean()), 2)
        summary["ppo_beats_all_bots"] = all(table["ppo"].mean() > table[n].mean() for n in bots)
    if cfg.eval.replays and cfg.env.name.lower() == "prospector":
        first = result.state if seeds == 1 else jax.tree.map(lambda x: x[0], result.state)
        summary["replays"] = write_replays(ppo, cfg, first)
    if jax.process_index() == 0:
        print(format_table(summary), flush=True)
    return summary


def write_replays(ppo: PPO, cfg: Config, state) -> list[str]:
    """Prospector replays of PPO and the market-timer bot on the first evaluation episodes.

    Process 0 alone, on a host copy of the (replicated) params, so no collective is needed.
    """
    if jax.process_index() != 0:
        return []
    from jaxrl.envs.prospector import replay

    params, obs_stats = jax.device_get((state.params, state.obs_stats))
    act = lambda k, obs, mask: ppo.act(params, k, obs, mask, obs_stats=obs_stats,  # noqa: E731
                                       greedy=cfg.eval.greedy)
    policies = {"ppo": act, "market_timer": replay.bot_policies()["market_timer"]}
    paths = replay.write_policy_replays(cfg.run.dir, policies, ppo.env, ppo.env_params,
                                        seed=cfg.eval.seed, episodes=cfg.eval.replays)
    return [str(p) for p in paths]


def _stats(returns: np.ndarray) -> dict[str, float]:
    return {"mean": round(float(np.mean(returns)), 2), "median": round(float(np.median(returns)), 2),
            "std": round(float(np.std(returns)), 2), "min": round(float(np.min(returns)), 2),
            "max": round(float(np.max(returns)), 2)}


def format_table(summary: dict) -> str:
    rows = summary["returns"]
    lines = [
        "",
        f"{summary['env']} ({summary['env_impl']} core): {summary['updates']} PPO updates, "
        f"{summary['env_steps']:,} env steps in {summary['train_seconds']} s",
        f"returns over the same {summary['eval_episodes']} seeded episodes "
        f"(PPO actions {summary['eval_policy']}):",
        f"  {'policy':<18}{'mean':>9}{'median':>9}{'std':>9}{'min':>9}{'max':>9}",
    ]
    for name, s in sorted(rows.items(), key=lambda kv: -kv[1]["mean"]):
        lines.append(f"  {name:<18}" + "".join(f"{s[k]:>9.2f}" for k in
                                               ("mean", "median", "std", "min", "max")))
    if "ppo_beats_all_bots" in summary:
        verdict = "beats" if summary["ppo_beats_all_bots"] else "does NOT beat"
        lines.append(f"PPO {verdict} every bot (mean vs best bot: "
                     f"{summary['ppo_minus_best_bot']:+.2f}).")
    return "\n".join(lines)
