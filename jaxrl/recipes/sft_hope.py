"""Pretrain HOPE (or HOPE-attention, or a Titans LM) on a text corpus with the SFT recipe's parts.

The loss, train and eval steps, data, step compiler and loop are the SFT recipe's own
(`sft.lm_loss` through `sft.train_step` / `sft.eval_step`): HOPE takes GPT-2's call
interface. Each example's fast memories start from their meta-learned initial state at every
sequence and are written inside the forward pass, per example, also on a sharded mesh and on
several processes (each reads its slice of the batch; process 0 writes the export).
Reports train and validation loss and the parameter count, and writes the final model to
`<run dir>/hope` (`hope.save_pretrained`: config.json + model.safetensors), which
`configs/eval_lm.yaml model=<run dir>/hope` evaluates. No text samples.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxrl.algorithms.optimizer import OptimizerConfig, make_optimizer
from jaxrl.core.config import ConfigError, RecipeConfig
from jaxrl.core.loop import train
from jaxrl.core.mesh import check_batch_size, make_mesh, replicate
from jaxrl.core.step import compile_eval, compile_step, sharded_init
from jaxrl.core.train_state import TrainState
from jaxrl.data.lm import LMDataConfig, load_lm_data
from jaxrl.models.hope import HOPE, HopeConfig, parameter_count, save_pretrained
from jaxrl.recipes import sft

@dataclasses.dataclass
class Config(RecipeConfig):
    model: HopeConfig = dataclasses.field(default_factory=HopeConfig)
    data: LMDataConfig = dataclasses.field(default_factory=LMDataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    eval_batches: int = 16  # validation batches per evaluation (0: the whole split)


def run(cfg: Config) -> dict:
    if cfg.model.mixer == "attention" and cfg.data.seq_len > cfg.model.n_positions:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.n_positions="
                          f"{cfg.model.n_positions} (the attention variant's learned positions).")
    mesh = make_mesh(cfg.mesh)
    check_batch_size(cfg.data.batch_size, mesh, "data.batch_size")
    data = load_lm_data(cfg.data)
    tokenizer = data.tokenizer
    model_cfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size,
                                    pad_id=tokenizer.pad_id)
    tx = make_optimizer(cfg.optimizer)
    init = sharded_init(
        lambda: TrainState.create(HOPE(model_cfg, rngs=nnx.Rngs(cfg.run.seed)), tx), mesh)
    n_params = parameter_count(nnx.eval_shape(lambda: HOPE(model_cfg, rngs=nnx.Rngs(0))))
    if jax.process_index() == 0:
        print(f"[sft_hope] {model_cfg.mixer} HOPE, {n_params:,} parameters", flush=True)
    step_fn = compile_step(sft.train_step, mesh, init.shardings)
    evaluate = compile_eval(sft.eval_step, mesh, init.shardings)

    def eval_fn(state, step):
        val_loss = sft.validation_loss(evaluate, state, data, mesh, cfg.eval_batches)
        if jax.process_index() == 0:
            print(f"\n[step {step}] val_loss {val_loss:.4f}  val_ppl {np.exp(val_loss):.2f}",
                  flush=True)
        return {"val_loss": val_loss, "val_ppl": float(np.exp(val_loss))}

    start = time.perf_counter()
    result = train(cfg, state=init, step_fn=step_fn, key=jax.random.key(cfg.run.seed),
                   batches=data.train_iterator(), eval_fn=eval_fn, mesh=mesh,
                   tokens_per_step=cfg.data.batch_size * cfg.data.seq_len)
    model_dir = Path(cfg.run.dir) / "hope"
    final = replicate(result.state.replace(opt_state=None), mesh)  # collective: all processes
    if jax.process_index() == 0:
        save_pretrained(final.model(), model_dir, tokenizer=tokenizer.name)
    summary = {
        "steps": result.step,
        "parameters": n_params,
        "train_loss": result.last_metrics.get("loss"),
        **result.eval_metrics,
        "seconds": round(time.perf_counter() - start, 1),
        "model_dir": str(model_dir),
    }
    if jax.process_index() == 0:
        print("\n" + "\n".join(f"  {k:<12} {v}" for k, v in summary.items()), flush=True)
    return summary
