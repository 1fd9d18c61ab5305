"""On-policy distillation of a Verilog GPT-2 from a stronger teacher on the RTL problems.

The student samples completions of the training split's prompts, the teacher (another GPT-2,
same tokenizer, on the same mesh) scores those tokens in one forward pass, and the update
(`jaxrl.algorithms.distill`) follows the per-token reverse KL, optionally mixed with the
simulator's reward. Without the mix no training completion is simulated; evaluations grade
the eval split as `rtl_rl` does, so pass@1 and grader cost compare directly.
"""

from __future__ import annotations

import dataclasses
import functools

from jaxrl.algorithms import distill
from jaxrl.algorithms.optimizer import OptimizerConfig
from jaxrl.core.config import ConfigError, RecipeConfig
from jaxrl.core.mesh import make_mesh
from jaxrl.data.tokenizer import Tokenizer
from jaxrl.envs.text.collector import GuardConfig, RolloutConfig
from jaxrl.envs.text.rtl import RTLEnvConfig, render_answer
from jaxrl.recipes import reinforce
from jaxrl.recipes.rtl_rl import SFT_COMMAND, setup

# The teacher is the same SFT trained longer: the student's run (500 steps) taken to 1000.
TEACHER_COMMAND = "python -m jaxrl.launch configs/sft_gpt2_verilog.yaml"
SINGLE_PROCESS = reinforce.SINGLE_PROCESS


@dataclasses.dataclass
class Config(RecipeConfig):
    init_from: str = "runs/sft_gpt2_verilog_student/hf"  # the student: HF GPT-2 directory
    teacher: str = "runs/sft_gpt2_verilog/hf"  # the teacher: HF GPT-2 directory
    tokenizer: str = "gpt2"  # the student's: "gpt2" or a trained tokenizer directory
    teacher_tokenizer: str = "gpt2"  # what the teacher was trained with ("gpt2" or a tokenizer path)
    rtl: RTLEnvConfig = dataclasses.field(default_factory=RTLEnvConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=lambda: RolloutConfig(max_new_tokens=320))
    distill: distill.DistillConfig = dataclasses.field(default_factory=distill.DistillConfig)
    guard: GuardConfig = dataclasses.field(default_factory=GuardConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(
        lr=1e-4, warmup_steps=5, decay_steps=1000, weight_decay=0.0))
    samples_per_eval: int = 4

    def validate(self):
        self.distill.check_rollout(group_size=self.rollout.group_size,
                                   temperature=self.rollout.sampling.temperature)


def run(cfg: Config) -> dict:
    tokenizer = Tokenizer.from_spec(cfg.tokenizer)
    student = reinforce.load_policy(cfg.init_from, SFT_COMMAND, tokenizer)
    teacher = reinforce.load_policy(cfg.teacher, TEACHER_COMMAND)
    mesh = make_mesh(cfg.mesh)
    rtl = setup(cfg, tokenizer, student, mesh, grade_train=cfg.distill.reward_coef > 0)
    texts = [t for p in rtl.env.problems for t in (p.prompt, render_answer(p.reference or ""))]
    distill.check_tokenization(tokenizer, Tokenizer.from_spec(cfg.teacher_tokenizer), texts,
                               student_vocab=student.cfg.vocab_size,
                               teacher_vocab=teacher.cfg.vocab_size)
    if teacher.cfg.n_positions < student.cfg.n_positions:
        raise ConfigError(f"the teacher's n_positions={teacher.cfg.n_positions} is shorter than "
                          f"the student's {student.cfg.n_positions}: it cannot score full rollouts.")
    try:
        summary = reinforce.train_policy(
            cfg, student, rtl.env, rtl.eval_env, mesh=mesh, eval_size=rtl.eval_size,
            update=functools.partial(distill.update, cfg=cfg.distill), reference=teacher,
            make_collector=rtl.make_collector)
    finally:
        rtl.grader.close()
    return {**summary, "simulations": len(rtl.grader.cache)}
