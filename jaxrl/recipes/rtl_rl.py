"""RL of a GPT-2 on Verilog problems against the simulator's shaped reward (group advantages,
IS or PPO-clip loss, optional KL), single- or multi-turn, with an optional curriculum.

The REINFORCE recipe's loop (`reinforce.train_policy`) over the RTL env (`jaxrl.envs.text.rtl`):
the training split of the problems trains, the eval split is sampled at each evaluation
(`eval/passed` is pass@1 at the rollout temperature). Logs reward, each grading stage,
entropy, KL and samples; the summary adds unique simulations run and wall time.
"""

from __future__ import annotations

import dataclasses
import functools

from jaxrl.algorithms.optimizer import OptimizerConfig
from jaxrl.algorithms.policy_gradient import PolicyGradientConfig, update
from jaxrl.core.config import ConfigError, RecipeConfig
from jaxrl.core.mesh import make_mesh
from jaxrl.data.tokenizer import Tokenizer
from jaxrl.envs.text.collector import GuardConfig, RolloutCollector, RolloutConfig
from jaxrl.envs.text.rtl import (MultiTurnCollector, RTLEnv, RTLEnvConfig, difficulty, load_problems,
                                 read_pass_rates)
from jaxrl.eval.sandbox import Sandbox
from jaxrl.eval.verilog import VerilogGrader
from jaxrl.recipes import reinforce

SFT_COMMAND = ("python -m jaxrl.launch configs/sft_gpt2_verilog.yaml loop.steps=500 "
               "run.dir=runs/sft_gpt2_verilog_student (after the two `python -m jaxrl.data` "
               "commands in that file's header)")
SINGLE_PROCESS = reinforce.SINGLE_PROCESS


@dataclasses.dataclass
class Config(RecipeConfig):
    init_from: str = "runs/sft_gpt2_verilog_student/hf"  # HF GPT-2 directory (the Verilog SFT export)
    tokenizer: str = "gpt2"  # "gpt2" or the trained tokenizer directory the SFT data was made with
    rtl: RTLEnvConfig = dataclasses.field(default_factory=RTLEnvConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=lambda: RolloutConfig(max_new_tokens=320))
    reinforce: PolicyGradientConfig = dataclasses.field(default_factory=PolicyGradientConfig)
    guard: GuardConfig = dataclasses.field(default_factory=GuardConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(
        lr=1e-4, warmup_steps=5, decay_steps=1000, weight_decay=0.0))
    samples_per_eval: int = 4

    def validate(self):
        self.reinforce.check_rollout(batch_size=self.rollout.batch_size,
                                     group_size=self.rollout.group_size,
                                     temperature=self.rollout.sampling.temperature)
        if self.rtl.turns > 1 and self.rollout.prefetch:
            raise ConfigError(f"rtl.turns={self.rtl.turns} grades each batch between its turns, so "
                              "the next batch cannot be sampled meanwhile: set "
                              "rollout.prefetch=false with multi-turn rollouts.")


@dataclasses.dataclass
class RTLSetup:
    """The envs a recipe trains and evaluates on, and what they share."""

    env: RTLEnv
    eval_env: RTLEnv
    eval_size: int  # eval completions: eval problems x rtl.eval_samples, rounded up to the mesh
    grader: VerilogGrader
    make_collector: object


def setup(cfg, tokenizer, model, mesh, *, grade_train: bool = True) -> RTLSetup:
    """Problems, grader, envs and collectors for `cfg.rtl`, checked against the model's width.

    grade_train=False: training completions are not simulated (a distillation run that does
    not mix in the env reward pays no grader calls for training).
    """
    rtl: RTLEnvConfig = cfg.rtl
    width = rtl.prompt_width
    if width + cfg.rollout.max_new_tokens > model.cfg.n_positions:
        raise ConfigError(f"the prompt width ({width}: rtl.prompt_width) + rollout.max_new_tokens "
                          f"({cfg.rollout.max_new_tokens}) exceeds the model's n_positions="
                          f"{model.cfg.n_positions}; lower one or use a wider model.")
    train = load_problems(rtl, tokenizer, "train")
    held_out = load_problems(rtl, tokenizer, "eval")
    grader = VerilogGrader(Sandbox(rtl.sandbox), workers=rtl.workers or None)
    order = None
    if rtl.curriculum != "none":
        rates = read_pass_rates(rtl.pass_rates) if rtl.curriculum == "pass_rate" else None
        order = difficulty(train, tokenizer, rtl.curriculum, rates).argsort(kind="stable")
    env = RTLEnv(train, tokenizer, grader if grade_train else None, max_prompt_tokens=width,
                 seed=cfg.run.seed, order=order, curriculum_steps=rtl.curriculum_steps,
                 curriculum_start=rtl.curriculum_start)
    eval_env = RTLEnv(held_out, tokenizer, grader, max_prompt_tokens=width, seed=cfg.run.seed)
    devices = mesh.shape["data"] * mesh.shape["fsdp"]  # the batch is split over these
    eval_size = -(-len(held_out) * rtl.eval_samples // devices) * devices
    print(f"[rtl] {len(train)} train / {len(held_out)} eval problems; {eval_size} eval completions",
          flush=True)
    make_collector = RolloutCollector
    if rtl.turns > 1:
        make_collector = functools.partial(_multi_turn, rtl=rtl)
    return RTLSetup(env, eval_env, eval_size, grader, make_collector)


def _multi_turn(env, graphdef, rollout_cfg, *, rtl, **kwargs):
    return MultiTurnCollector(env, graphdef, rollout_cfg, rtl, **kwargs)


def run(cfg: Config) -> dict:
    tokenizer = Tokenizer.from_spec(cfg.tokenizer)
    model = reinforce.load_policy(cfg.init_from, SFT_COMMAND, tokenizer)
    mesh = make_mesh(cfg.mesh)
    rtl = setup(cfg, tokenizer, model, mesh)
    try:
        summary = reinforce.train_policy(
            cfg, model, rtl.env, rtl.eval_env, mesh=mesh, eval_size=rtl.eval_size,
            update=functools.partial(update, cfg=cfg.reinforce), make_collector=rtl.make_collector)
    finally:
        rtl.grader.close()
    return {**summary, "simulations": len(rtl.grader.cache)}
