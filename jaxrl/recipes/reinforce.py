"""Fine-tune a GPT-2 checkpoint with REINFORCE / PPO-clip (RLOO, GRPO, Dr.GRPO advantages)
towards positive sentiment.

Starts from a Hugging Face-layout GPT-2 directory (by default the one the SFT recipe exports),
samples completions of corpus prompts (`rollout:`), scores them on the host (VADER sentiment +
length penalty), and updates on the task reward with a per-token KL term to the frozen
starting model (`reinforce:`, `jaxrl.algorithms.policy_gradient`). Logs every reward
component, entropy, KL and response length; each evaluation scores held-out prompts and
appends a few samples to `<run dir>/samples.jsonl` (step 0 = before training).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
from flax import nnx

from jaxrl.algorithms.optimizer import OptimizerConfig, make_optimizer
from jaxrl.algorithms.policy_gradient import PolicyGradientConfig, init_state, update
from jaxrl.core.config import ConfigError, RecipeConfig
from jaxrl.core.checkpoint import Checkpointer
from jaxrl.core.loop import checkpoint_dir, train
from jaxrl.core.mesh import batch_sharding, check_batch_size, make_mesh, replicate, shard_state
from jaxrl.core.step import compile_step, sharded_init
from jaxrl.data.sources import load_prompts, resolve_path
from jaxrl.data.tokenizer import Tokenizer
from jaxrl.envs.text import LengthPenaltyConfig, SentimentReward, TextEnv
from jaxrl.envs.text.collector import (CollapseGuard, GuardConfig, RolloutCollector, RolloutConfig,
                                      make_train_step)
from jaxrl.models import gpt2

SFT_COMMAND = "python -m jaxrl.launch configs/sft_gpt2_shakespeare.yaml"
# Refused with several processes (checked by `jaxrl.launch` before any device work).
SINGLE_PROCESS = ("its rollout collector reads whole batches on the host; run it on one host "
                  "(mesh settings still use all of that host's devices)")


@dataclasses.dataclass
class PromptConfig:
    """Where prompts come from (see `jaxrl.data.sources.load_prompts`)."""

    path: str = "corpora/tinyshakespeare/input.txt"
    data_dir: str = ""  # root for a relative path; empty: $JAXRL_DATA_DIR or ../shared/data
    prefix_tokens: int = 8  # >0: the first tokens of each document; 0: one prompt per line/row
    separator: str = "\n\n"  # splits a text file into documents (prefix mode)
    text_field: str = "prompt"  # JSONL field
    limit: int = 0  # keep the first N prompts (0: all)
    eval_prompts: int = 32  # the last N prompts are held out and scored at each evaluation

    def validate(self):
        if self.prefix_tokens < 0 or self.limit < 0 or self.eval_prompts < 1:
            raise ConfigError("prompts: prefix_tokens and limit must be >= 0 and eval_prompts >= 1, "
                              f"got {self.prefix_tokens}, {self.limit}, {self.eval_prompts}.")


@dataclasses.dataclass
class RewardConfig:
    sentiment_weight: float = 1.0
    length_penalty: LengthPenaltyConfig = dataclasses.field(default_factory=LengthPenaltyConfig)


@dataclasses.dataclass
class Config(RecipeConfig):
    init_from: str = "runs/sft_gpt2_shakespeare/hf"  # HF GPT-2 directory (the SFT recipe's export)
    prompts: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    reinforce: PolicyGradientConfig = dataclasses.field(default_factory=PolicyGradientConfig)
    guard: GuardConfig = dataclasses.field(default_factory=GuardConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(
        lr=1e-4, warmup_steps=10, decay_steps=1000, weight_decay=0.0))
    samples_per_eval: int = 4  # completions printed and written to samples.jsonl per evaluation

    @property
    def prompt_width(self) -> int:
        """Prompt columns: the prefix length, or 32 tokens of a whole-line prompt."""
        return self.prompts.prefix_tokens or 32

    def validate(self):
        self.reinforce.check_rollout(batch_size=self.rollout.batch_size,
                                     group_size=self.rollout.group_size,
                                     temperature=self.rollout.sampling.temperature)


def load_policy(init_from: str, sft_command: str = SFT_COMMAND,
                tokenizer: Tokenizer | None = None) -> gpt2.GPT2:
    """A HF GPT-2 directory, checked (before loading) against the tokenizer it will read."""
    path = Path(init_from)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"init_from={init_from!r}: no GPT-2 checkpoint there ({path / 'config.json'} is "
            f"missing). Train one with `{sft_command}` (it writes <run dir>/hf), "
            "or set init_from=<a Hugging Face GPT-2 directory>.")
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    if tokenizer is not None and vocab + 1 != tokenizer.vocab_size:  # + our pad row
        raise ConfigError(
            f"{init_from!r} has a vocabulary of {vocab} ids (+ pad) but the tokenizer "
            f"{tokenizer.name!r} has {tokenizer.vocab_size}: the model would read other tokens "
            "than it was trained on. Set `tokenizer:` to the one its SFT data was made with.")
    return gpt2.from_pretrained(path)


def run(cfg: Config) -> dict:
    tokenizer = Tokenizer.gpt2()
    model = load_policy(cfg.init_from)
    if cfg.prompt_width + cfg.rollout.max_new_tokens > model.cfg.n_positions:
        raise ConfigError(f"prompt width ({cfg.prompt_width}: prompts.prefix_tokens, or 32 "
                          f"without) + rollout.max_new_tokens ({cfg.rollout.max_new_tokens}) "
                          f"exceeds the model's n_positions={model.cfg.n_positions}.")
    prompts = load_prompts(resolve_path(cfg.prompts.path, cfg.prompts.data_dir), prefix_tokens=cfg.prompts.prefix_tokens,
                           separator=cfg.prompts.separator, text_field=cfg.prompts.text_field,
                           tokenizer=tokenizer, limit=cfg.prompts.limit)
    if len(prompts) <= cfg.prompts.eval_prompts:
        raise ConfigError(f"prompts: {len(prompts)} prompts leave none for training after holding "
                          f"out eval_prompts={cfg.prompts.eval_prompts}; lower it or add prompts.")
    reward = SentimentReward(cfg.reward.length_penalty, sentiment_weight=cfg.reward.sentiment_weight)
    env = TextEnv(prompts[:-cfg.prompts.eval_prompts], tokenizer, reward,
                  max_prompt_tokens=cfg.prompt_width, seed=cfg.run.seed)
    eval_env = TextEnv(prompts[-cfg.prompts.eval_prompts:], tokenizer, reward,
                       max_prompt_tokens=cfg.prompt_width, seed=cfg.run.seed)
    mesh = make_mesh(cfg.mesh)
    check_batch_size(cfg.prompts.eval_prompts, mesh, "prompts.eval_prompts")
    return train_policy(cfg, model, env, eval_env, mesh=mesh, eval_size=cfg.prompts.eval_prompts,
                        update=functools.partial(update, cfg=cfg.reinforce))


def train_policy(cfg, model: gpt2.GPT2, env: TextEnv, eval_env: TextEnv, *, mesh, eval_size: int,
                 update: Callable, reference: gpt2.GPT2 | None = None,
                 make_collector: Callable = RolloutCollector) -> dict:
    """The LM-RL run every text-env recipe shares: sample, score, update; evaluate and save.

    `cfg` carries `run`, `loop`, `rollout`, `guard`, `optimizer` and `samples_per_eval`;
    `update(state, rollout, key)` is a pure update (policy gradient, distillation) compiled
    here. `reference` scores `Rollout.ref_logprobs` (default: the frozen starting policy; a
    distillation teacher). `make_collector(env, graphdef, rollout_cfg, **kw)` builds the
    collectors (the multi-turn RTL one, say). Each evaluation collects `eval_size`
    completions of `eval_env` with the same key, logs every reward component and the KL to
    the reference, and appends a few samples to `<run dir>/samples.jsonl` (step 0 = before
    training).
    """
    check_batch_size(cfg.rollout.batch_size, mesh, "rollout.prompts_per_step*group_size")
    graphdef, weights = nnx.split(model)
    tx = make_optimizer(cfg.optimizer)
    init = sharded_init(lambda w: init_state(nnx.merge(graphdef, w), tx), mesh, weights)
    reference = reference or model
    ref_graphdef = nnx.graphdef(reference)
    ref_params = shard_state(nnx.state(reference, nnx.Param), mesh)  # frozen
    update_fn = compile_step(update, mesh, init.shardings)
    place = lambda ndim: batch_sharding(mesh, ndim)  # noqa: E731
    collector = make_collector(env, init.abstract.graphdef, cfg.rollout,
                               n_positions=model.cfg.n_positions, ref_params=ref_params,
                               batch_sharding=place, ref_graphdef=ref_graphdef)
    step_fn, collector = make_train_step(
        env, init.abstract.graphdef, cfg.rollout, n_positions=model.cfg.n_positions,
        ref_params=ref_params, update_fn=update_fn, batch_sharding=place,
        guard=CollapseGuard(cfg.guard), collector=collector)
    eval_rollout = cfg.rollout.for_eval(eval_size)
    evaluator = make_collector(eval_env, init.abstract.graphdef, eval_rollout,
                               n_positions=model.cfg.n_positions, ref_params=ref_params,
                               batch_sharding=place, ref_graphdef=ref_graphdef)
    run_dir = Path(cfg.run.dir)
    eval_key = jax.random.key(cfg.run.seed + 1)  # the same key every eval: comparable samples

    def eval_fn(state, step: int) -> dict:
        rollout = jax.device_get(evaluator.collect(state.params, 0, eval_key))
        response = rollout.response_mask
        metrics = {f"eval/{k}": float(v.mean()) for k, v in rollout.rewards.items()}
        metrics["eval/response_length"] = float(response.sum(-1).mean())
        metrics["eval/kl"] = float(((rollout.logprobs - rollout.ref_logprobs) * response).sum(-1).mean())
        if jax.process_index() == 0:
            rows = evaluator.last_samples.rows(cfg.samples_per_eval)
            with (run_dir / "samples.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, **metrics, "samples": rows}) + "\n")
            print(f"\n[step {step}] " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
            for row in rows[:2]:
                print(f"  {row['prompt'][-80:]!r} -> {row['completion'][:160]!r}", flush=True)
        return metrics

    existing = Checkpointer(checkpoint_dir(cfg))
    fresh = existing.latest_step() is None
    existing.close()
    state = init() if fresh else init  # a resumed run restores straight into init's layout
    initial = eval_fn(state, 0) if fresh else {}
    start = time.perf_counter()
    result = train(cfg, state=state, step_fn=step_fn, key=jax.random.key(cfg.run.seed),
                   eval_fn=eval_fn, mesh=mesh)
    summary = {
        "steps": result.step,
        "seconds": round(time.perf_counter() - start, 1),
        **{f"initial_{k}": v for k, v in initial.items()},
        **result.eval_metrics,
        **{f"train/{k}": v for k, v in result.last_metrics.items()
           if k.startswith("reward") or k in ("kl", "entropy")},
    }
    final = replicate(result.state.replace(opt_state=None), mesh)
    if jax.process_index() == 0:
        gpt2.save_pretrained(final.model(), run_dir / "hf")
        print("\n" + "\n".join(f"  {k:<28} {v}" for k, v in summary.items()), flush=True)
    return summary
