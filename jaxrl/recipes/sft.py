"""Train or fine-tune GPT-2 on a text corpus (next-token loss on packed windows), with samples.

Reports train loss, validation loss and perplexity; samples text at each evaluation; exports
the final model in Hugging Face layout to `<run dir>/hf` (what the RL recipes start from).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrl.algorithms.optimizer import OptimizerConfig, make_optimizer
from jaxrl.core.config import ConfigError, RecipeConfig
from jaxrl.core.loop import train
from jaxrl.core.mesh import check_batch_size, make_mesh, replicate, shard_batch
from jaxrl.core.step import ShardedInit, compile_eval, compile_step, sharded_init
from jaxrl.core.train_state import TrainState
from jaxrl.data.lm import LMDataConfig, load_lm_data
from jaxrl.data.tokenizer import Tokenizer
from jaxrl.models import gpt2
from jaxrl.models.generate import generate


@dataclasses.dataclass
class SampleConfig:
    """Text sampled at each evaluation, so progress can be read, not only measured."""

    prompts: list[str] = dataclasses.field(default_factory=lambda: ["\n"])
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 40


@dataclasses.dataclass
class Config(RecipeConfig):
    model: gpt2.GPT2Config = dataclasses.field(default_factory=lambda: gpt2.GPT2Config.preset("tiny"))
    init_from: str = ""  # a Hugging Face GPT-2 directory to fine-tune; empty: random init
    data: LMDataConfig = dataclasses.field(default_factory=LMDataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    eval_batches: int = 16  # validation batches per evaluation (0: the whole split)
    samples: SampleConfig = dataclasses.field(default_factory=SampleConfig)


def lm_loss(model: gpt2.GPT2, batch: dict, *, deterministic: bool = True, rngs=None):
    """Mean next-token cross-entropy over `loss_mask`; -> (loss, number of target tokens)."""
    logits = model(batch["tokens"], batch["attention_mask"], deterministic=deterministic, rngs=rngs)
    return masked_cross_entropy(logits, batch)


def masked_cross_entropy(logits: jax.Array, batch: dict):
    """Mean cross-entropy of `logits` against the batch's targets over `loss_mask`; -> (loss, count)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    count = mask.sum()
    return (losses * mask).sum() / jnp.maximum(count, 1.0), count


def train_step(state: TrainState, batch: dict, key: jax.Array):
    def loss_fn(params):
        loss, _ = lm_loss(state.model(params), batch, deterministic=False, rngs=key)
        return loss

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    return state.apply_gradients(grads), metrics


def eval_step(state: TrainState, batch: dict):
    """Summed loss and token count, so batches of different fill average correctly."""
    loss, count = lm_loss(state.model(), batch)
    return loss * count, count


def match_vocabulary(cfg: Config, tokenizer: Tokenizer) -> Config:
    """A model trained from scratch takes the data's vocabulary; a pretrained one must match it."""
    vocab = (tokenizer.vocab_size, tokenizer.pad_id)
    if cfg.init_from:
        hf = json.loads((Path(cfg.init_from) / "config.json").read_text()) \
            if (Path(cfg.init_from) / "config.json").is_file() else None
        if hf is not None and hf["vocab_size"] + 1 != tokenizer.vocab_size:
            raise ConfigError(f"init_from={cfg.init_from!r} has a vocabulary of {hf['vocab_size']} "
                              f"ids but the data was tokenized with {tokenizer!r}; use data made "
                              "with the model's tokenizer (GPT-2's), or train from scratch.")
        return cfg
    if (cfg.model.vocab_size, cfg.model.pad_id) == vocab:
        return cfg
    if jax.process_index() == 0:
        print(f"[sft] model vocabulary follows the data's tokenizer: {tokenizer!r}", flush=True)
    return dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id))


def initial_state(cfg: Config, tx: optax.GradientTransformation, mesh) -> ShardedInit:
    """Random init (born sharded), or the weights of `init_from` placed on the mesh."""
    if not cfg.init_from:
        return sharded_init(
            lambda: TrainState.create(gpt2.GPT2(cfg.model, rngs=nnx.Rngs(cfg.run.seed)), tx), mesh)
    path = Path(cfg.init_from)
    if not (path / "config.json").is_file():
        raise ConfigError(f"init_from={cfg.init_from!r} is not a Hugging Face GPT-2 directory "
                          "(config.json + model.safetensors or pytorch_model.bin).")
    model = gpt2.from_pretrained(path, dropout=cfg.model.dropout, dtype=cfg.model.dtype,
                                 param_dtype=cfg.model.param_dtype, remat=cfg.model.remat)
    graphdef, weights = nnx.split(model)
    return sharded_init(lambda w: TrainState.create(nnx.merge(graphdef, w), tx), mesh, weights)


def run(cfg: Config) -> dict:
    if cfg.data.seq_len > cfg.model.n_positions:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.n_positions="
                          f"{cfg.model.n_positions}.")
    mesh = make_mesh(cfg.mesh)
    check_batch_size(cfg.data.batch_size, mesh, "data.batch_size")
    data = load_lm_data(cfg.data)  # GPT-2's tokenizer, or a shard directory's own
    tokenizer = data.tokenizer
    cfg = match_vocabulary(cfg, tokenizer)
    init = initial_state(cfg, make_optimizer(cfg.optimizer), mesh)
    step_fn = compile_step(train_step, mesh, init.shardings)
    evaluate = compile_eval(eval_step, mesh, init.shardings)
    run_dir = Path(cfg.run.dir)

    def eval_fn(state, step):
        val_loss = validation_loss(evaluate, state, data, mesh, cfg.eval_batches)
        texts = sample(replicate(state.replace(opt_state=None), mesh), tokenizer, cfg.samples,
                       jax.random.key(cfg.run.seed + step))
        if jax.process_index() == 0:
            with (run_dir / "samples.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, "samples": texts}) + "\n")
            print(f"\n[step {step}] val_loss {val_loss:.4f}  val_ppl {np.exp(val_loss):.2f}\n"
                  f"  sample: {texts[0][:200]!r}", flush=True)
        return {"val_loss": val_loss, "val_ppl": float(np.exp(val_loss))}

    start = time.perf_counter()
    result = train(cfg, state=init, step_fn=step_fn, key=jax.random.key(cfg.run.seed),
                   batches=data.train_iterator(), eval_fn=eval_fn, mesh=mesh,
                   tokens_per_step=cfg.data.batch_size * cfg.data.seq_len)
    final = replicate(result.state.replace(opt_state=None), mesh)  # collective: all processes
    if jax.process_index() == 0:
        gpt2.save_pretrained(final.model(), run_dir / "hf")
    summary = {
        "steps": result.step,
        "train_loss": result.last_metrics.get("loss"),
        **result.eval_metrics,
        "seconds": round(time.perf_counter() - start, 1),
        "model_dir": str(run_dir / "hf"),
    }
    if jax.process_index() == 0:
        print("\n" + "\n".join(f"  {k:<12} {v}" for k, v in summary.items()), flush=True)
    return summary


def validation_loss(evaluate, state, data, mesh, max_batches: int) -> float:
    """Mean token loss over the validation split (`max_batches`; 0: all), `evaluate` being
    `compile_eval(eval_step, ...)`: sums and counts, so a half-filled last batch weighs right."""
    total, count = 0.0, 0.0
    for batch in data.val_batches(max_batches):
        loss_sum, n = jax.device_get(evaluate(state, shard_batch(batch, mesh)))
        total, count = total + float(loss_sum), count + float(n)
    return total / max(count, 1.0)


def sample(state: TrainState, tokenizer: Tokenizer, cfg: SampleConfig, key) -> list[str]:
    """Decode a few continuations of `cfg.prompts` (left-padded) for a human to read."""
    encoded = [tokenizer.encode(p) or [tokenizer.eot_id] for p in cfg.prompts]
    width = max(map(len, encoded))
    prompt = np.full((len(encoded), width), tokenizer.pad_id, np.int32)
    for row, ids in enumerate(encoded):
        prompt[row, width - len(ids):] = ids
    graphdef, params = nnx.split(state.model())
    out = generate(graphdef, params, jnp.asarray(prompt), jnp.asarray(prompt != tokenizer.pad_id),
                   key, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                   top_k=cfg.top_k, eos_id=tokenizer.eot_id, pad_id=tokenizer.pad_id)
    tokens, mask = jax.device_get((out.tokens, out.response_mask))
    return [p + tokenizer.decode([int(t) for t, m in zip(row, keep) if m])
            for p, row, keep in zip(cfg.prompts, tokens, mask)]
