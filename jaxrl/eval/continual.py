"""Continual learning: train on segments one after another, measure cross-entropy on all of them.

Each segment (a text file / directory / shard dir, optionally a token slice of it given as
fractions `start`..`stop`) is tokenized into one stream; its last `eval_fraction` is held out
and cut into disjoint windows of `seq_len + 1` tokens. The model is scored on every segment's
held-out windows before training (stage "start") and after training `steps` AdamW steps on
each segment in turn (one optimizer throughout, batches of random windows of the segment's
training part). `ce[stage][segment]` is the mean next-token cross-entropy in nats;
`forgetting[segment]` = CE after the last stage minus CE right after training on that segment
(positive: forgotten); `forgetting_memorize` is the same from `ce_memorize`.

With test-time memorisation (models that have `memorize`, see `lm_model`), every stage is
scored a second time reading each segment's held-out windows in order: window i is scored by
the model after it memorised windows 0..i-1 of that segment, so no token is scored after it
was memorised; the memory starts afresh for each segment and stage. GPT-2 has no test-time
memory, so for it `ce_memorize` is null and `memorize` says why.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
from flax import nnx

from jaxrl.core.mesh import shard_batch
from jaxrl.core.step import compile_step, sharded_init
from jaxrl.core.train_state import TrainState
from jaxrl.data.lm import batch_from_windows
from jaxrl.eval.lm_model import NNXLM, LanguageModel, can_memorize, score_sequences


@dataclasses.dataclass(frozen=True)
class Segment:
    name: str
    train: np.ndarray  # tokens
    held_out: list[np.ndarray]  # windows of seq_len + 1 tokens


def make_segment(name: str, tokens: np.ndarray, *, seq_len: int, eval_fraction: float,
                 eval_windows: int) -> Segment:
    """Split a stream into a training part and up to `eval_windows` held-out windows."""
    cut = int(len(tokens) * (1.0 - eval_fraction))
    held = tokens[cut:]
    windows = [held[i : i + seq_len + 1] for i in range(0, len(held) - seq_len, seq_len)][:eval_windows]
    if not windows or cut < seq_len + 1:
        raise ValueError(f"segment {name!r}: {len(tokens)} tokens are too few for seq_len={seq_len} "
                         f"with eval_fraction={eval_fraction}; give a longer slice.")
    return Segment(name, tokens[:cut], windows)


def cross_entropy(lm: LanguageModel, windows: list[np.ndarray], batch_size: int) -> float:
    scores = score_sequences(lm, windows, batch_size)
    return float(-np.mean(np.concatenate([s.logprobs[1:] for s in scores])))


def cross_entropy_memorizing(lm: LanguageModel, windows: list[np.ndarray], batch_size: int) -> float:
    """Score window i after memorising windows 0..i-1 (module docstring)."""
    nll, model = [], lm
    for w in windows:
        nll.append(-score_sequences(model, [w], batch_size)[0].logprobs[1:])
        tokens = np.full((batch_size, len(w)), lm.pad_id, np.int32)
        mask = np.zeros_like(tokens)
        tokens[0], mask[0] = w, 1
        model = model.memorize(tokens, mask)
    return float(np.mean(np.concatenate(nll)))


def _train_step(state: TrainState, batch: dict, key):
    del key  # no dropout: the model is built deterministic

    def loss_fn(params):
        logits = state.model(params)(batch["tokens"], batch["attention_mask"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return (losses * batch["loss_mask"]).sum() / jax.numpy.maximum(batch["loss_mask"].sum(), 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def continual_curve(lm: NNXLM, segments: list[Segment], *, steps: int, lr: float = 1e-3,
                    batch_size: int = 8, seq_len: int = 128, seed: int = 0) -> dict:
    """The CE matrix of the module docstring, with and (if the model has it) without memorisation."""
    if steps < 1:
        raise ValueError(f"steps={steps}: train at least one step per segment.")
    rng = np.random.default_rng(seed)
    init = sharded_init(lambda: TrainState.create(lm.module(), optax.adamw(lr)), lm.mesh)
    step_fn = compile_step(_train_step, lm.mesh, init.shardings)
    state, key = init(), jax.random.key(seed)
    memorizes = can_memorize(lm)

    def measure(model) -> tuple[list[float], list[float] | None]:
        plain = [cross_entropy(model, s.held_out, batch_size) for s in segments]
        mem = [cross_entropy_memorizing(model, s.held_out, batch_size) for s in segments] if memorizes else None
        return plain, mem

    plain, mem = measure(lm)
    stages, ce, ce_mem, losses = ["start"], [plain], [mem], []
    for seg in segments:
        for _ in range(steps):
            starts = rng.integers(0, len(seg.train) - seq_len, batch_size)
            batch = batch_from_windows([seg.train[s : s + seq_len + 1] for s in starts], lm.pad_id)
            state, metrics = step_fn(state, shard_batch(batch, lm.mesh), key)
        losses.append(float(metrics["loss"]))
        trained = lm.with_params(nnx.state(state.model()))
        plain, mem = measure(trained)
        stages.append(f"after {seg.name}")
        ce.append(plain)
        ce_mem.append(mem)
    names = [s.name for s in segments]

    def forgetting(m):
        return {n: m[-1][j] - m[j + 1][j] for j, n in enumerate(names)}

    return {
        "segments": names, "stages": stages, "steps_per_segment": steps, "ce": ce,
        "ce_memorize": ce_mem if memorizes else None,
        "memorize": "scored with test-time memorisation too" if memorizes else
                    "not measured: the model has no test-time memory (no `memorize`)",
        "final_train_loss": losses,
        "forgetting": forgetting(ce),
        "forgetting_memorize": forgetting(ce_mem) if memorizes else None,
    }
