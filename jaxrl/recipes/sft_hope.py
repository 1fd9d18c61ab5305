"""Pretrain HOPE (or HOPE-attention, or a Titans LM) on a text corpus with the SFT recipe's parts.

The loss, train and eval steps, data, step compiler and loop are the SFT recipe's own
(`sft.lm_loss` through `sft.train_step` / `sft.eval_step`): HOPE takes GPT-2's call
interface. Each example's fast memories start from their meta-learned initial state at every
sequence and are written inside the forward pass, per example, also on a sharded mesh and on
several processes (each reads its slice of the batch; process 0 writes the export).
Reports train and validation loss and the parameter count, and writes the final model to
`<run dir>/hope` (`hope.save_pretrained`: config.json + model.safetensors), which
`configs/eval_lm.yaml model=<run dir>/hope` evaluates. No text samples.

`model.cms.state: persistent` (continual learning, spec §4.3): the CMS levels are not reset per
sequence. The train state carries one CMS memory (`extra["memory"]`, per layer a
`cms.CMSMemory`: each level's weights as an offset on its initial weights, its pending gradients
and the token count), laid out like the CMS weights on the mesh and saved in the checkpoint,
so a resumed run continues it exactly. Each step every row starts from it (initial weights +
sg(offset)), writes as usual, and the next step's memory is the batch mean of the rows' final
CMS states. One memory, not one per row: the loader's rows are independent shuffled windows,
not B streams, so per-row memories would be B learners that each see 1/B of the data, cost B
times the memory, and leave no single model to export or evaluate; the mean also lets
evaluation and export use any batch size. Validation reads the memory without writing it, and
the export folds it into the CMS initial weights (`HOPE.absorb`; a pending partial chunk is
dropped). The mixers still start each sequence fresh.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from jaxrl.algorithms.optimizer import OptimizerConfig, make_optimizer
from jaxrl.core.config import ConfigError, RecipeConfig
from jaxrl.core.loop import train
from jaxrl.core.mesh import check_batch_size, make_mesh, replicate, replicated, state_shardings
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


def persistent_loss(model: HOPE, memory: tuple, batch: dict):
    """`sft.lm_loss` with the CMS starting from `memory`. -> (loss, (token count, memory'))."""
    fast = model.recall(memory, batch["tokens"].shape[0])
    logits, fast = model(batch["tokens"], batch["attention_mask"], fast=fast)
    loss, count = sft.masked_cross_entropy(logits, batch)
    return loss, (count, model.remember(fast))


def train_step(state: TrainState, batch: dict, key: jax.Array):
    """`sft.train_step`; with a memory in `state.extra` (cms.state: persistent), carries it."""
    if "memory" not in state.extra:
        return sft.train_step(state, batch, key)

    def loss_fn(params):
        loss, (_, memory) = persistent_loss(state.model(params), state.extra["memory"], batch)
        return loss, memory

    (loss, memory), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state.apply_gradients(grads, extra={"memory": memory}), metrics


def eval_step(state: TrainState, batch: dict):
    """`sft.eval_step`; with a memory, read from it (not written)."""
    if "memory" not in state.extra:
        return sft.eval_step(state, batch)
    loss, (count, _) = persistent_loss(state.model(), state.extra["memory"], batch)
    return loss * count, count


def initial_state(model_cfg: HopeConfig, tx, seed: int, mesh):
    """The train state born sharded; a persistent CMS memory is laid out as the CMS weights."""
    persistent = model_cfg.cms.state == "persistent"

    def make():
        model = HOPE(model_cfg, rngs=nnx.Rngs(seed))
        return TrainState.create(model, tx, extra={"memory": model.empty_memory()}
                                 if persistent else None)

    def shardings(abstract, mesh):
        out = state_shardings(abstract, mesh)
        if not persistent:
            return out
        def like(layer):  # per level (w_in, w_out): the CMS initial weights' shardings
            levels = out.params["h"][layer]["cms"]["init_weights"]
            return tuple((levels[i][0].get_value(), levels[i][1].get_value())
                         for i in range(len(levels)))

        memory = tuple(m.replace(offset=like(i), pending=like(i), count=replicated(mesh))
                       for i, m in enumerate(abstract.extra["memory"]))
        return out.replace(extra={"memory": memory})

    return sharded_init(make, mesh, shardings=shardings)


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
    init = initial_state(model_cfg, make_optimizer(cfg.optimizer), cfg.run.seed, mesh)
    n_params = parameter_count(nnx.eval_shape(lambda: HOPE(model_cfg, rngs=nnx.Rngs(0))))
    if jax.process_index() == 0:
        print(f"[sft_hope] {model_cfg.mixer} HOPE, {n_params:,} parameters", flush=True)
    step_fn = compile_step(train_step, mesh, init.shardings)
    evaluate = compile_eval(eval_step, mesh, init.shardings)

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
        model = final.model()
        if "memory" in final.extra:
            model.absorb(final.extra["memory"])
        save_pretrained(model, model_dir, tokenizer=tokenizer.name)
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
