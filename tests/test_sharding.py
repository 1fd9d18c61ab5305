"""The same train step on different meshes gives the same numbers as one device.

Gradients and losses are compared at 1e-5. Parameters after an Adam step are not: where a
gradient is ~0, reduction-order noise flips its sign and Adam turns that into a full lr step.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrl.algorithms.optimizer import OptimizerConfig, make_optimizer
from jaxrl.core.config import MeshConfig
from jaxrl.core.mesh import make_mesh, shard_batch, shard_state, state_shardings
from jaxrl.core.train_state import TrainState
from jaxrl.models.gpt2 import GPT2, GPT2Config
from jaxrl.recipes.sft import lm_loss, train_step

CFG = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32)


def _batch(seed=0, B=8, T=16):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50256, (B, T + 1)).astype(np.int32)
    mask = np.ones((B, T), np.float32)
    mask[:, -3:] = 0  # some padding at the end of rows
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
            "attention_mask": mask.astype(np.int32)}


def _run(mesh, steps=3):
    """Gradients of the first step, and the loss of each of `steps` AdamW steps."""
    state = TrainState.create(GPT2(CFG, rngs=nnx.Rngs(0)), make_optimizer(
        OptimizerConfig(lr=1e-3, warmup_steps=0, decay_steps=10)))
    state = shard_state(state, mesh)
    shardings = state_shardings(state, mesh)
    grads = jax.jit(jax.grad(lambda p, b: lm_loss(state.model(p), b)[0]))(
        state.params, shard_batch(_batch(0), mesh))
    step = jax.jit(train_step, out_shardings=(shardings, None), donate_argnums=0)
    losses = []
    for i in range(steps):
        state, metrics = step(state, shard_batch(_batch(i), mesh), jax.random.key(i))
        losses.append(float(metrics["loss"]))
    return jax.device_get(grads), losses, state


@pytest.fixture(scope="module")
def single_device():
    return _run(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_matches_single_device(shape, single_device):
    mesh = make_mesh(MeshConfig(*shape))
    grads, losses, state = _run(mesh)
    ref_grads, ref_losses, _ = single_device
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    # The layout is the one the rules ask for, not replicated by accident.
    qkv = state.params["h"][0]["attn"]["c_attn"]["kernel"][...]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")  # [out, in]
    _, fsdp, tensor = shape
    want = (3 * CFG.n_embd // tensor, CFG.n_embd // fsdp)
    assert qkv.shape == (3 * CFG.n_embd, CFG.n_embd)
    assert [s.data.shape for s in qkv.addressable_shards] == [want] * 8


def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
    from jaxrl.core.checkpoint import Checkpointer

    _, _, state = _run(make_mesh(MeshConfig(2, 2, 2)), steps=1)
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, state, meta={"step": 1})
    template = TrainState.create(GPT2(CFG, rngs=nnx.Rngs(1)), state.tx)
    other = make_mesh(MeshConfig(data=1, fsdp=8))
    restored, _, meta = ckpt.restore(shard_state(template, other))
    assert meta == {"step": 1}
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
        assert a.sharding.mesh.shape == other.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
