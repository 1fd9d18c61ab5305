"""AdamW helper: decay mask, warmup + cosine schedule, global-norm clipping, config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrl.algorithms.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer, weight_decay_mask
from jaxrl.core.config import ConfigError
from jaxrl.models.gpt2 import GPT2, GPT2Config


@pytest.fixture(scope="module")
def params():
    cfg = GPT2Config.preset("tiny", vocab_size=32, pad_id=31, n_layer=1, n_embd=16, n_head=2, n_positions=8)
    return nnx.state(GPT2(cfg, rngs=nnx.Rngs(0)), nnx.Param)


def flat(tree):
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_weight_decay_only_on_matrices(params):
    mask = flat(weight_decay_mask(params))
    decayed = {path for path, decays in mask.items() if decays}
    assert decayed == {path for path in mask if "kernel" in path}
    with_embeddings = {p for p, d in flat(weight_decay_mask(params, decay_embeddings=True)).items() if d}
    assert with_embeddings == decayed | {p for p in mask if "embedding" in p}


def test_update_decays_kernels_but_not_biases_or_norms(params):
    cfg = OptimizerConfig(lr=0.1, warmup_steps=0, decay_steps=10, weight_decay=0.5)
    tx = make_optimizer(cfg)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zero_grads, tx.init(params), params)
    new = flat(optax.apply_updates(params, updates))
    for path, old in flat(params).items():
        expected = old * (1 - 0.1 * 0.5) if "kernel" in path else old
        np.testing.assert_allclose(new[path], expected, rtol=1e-6, err_msg=path)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = OptimizerConfig(lr=1e-3, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(lr(60)), 0.55e-3, rtol=1e-5)  # half-way down the cosine
    np.testing.assert_allclose([float(lr(110)), float(lr(1000))], 1e-4, rtol=1e-6)
    after_warmup = np.array([float(lr(s)) for s in range(10, 111)])
    assert np.all(np.diff(after_warmup) <= 0)


def test_global_norm_clipping():
    # With a large Adam eps the first update scales with the gradient, so clipping shows.
    params = {"w": jnp.ones((2, 2))}
    big = {"w": jnp.full((2, 2), 50.0)}  # global norm 100
    bigger = {"w": jnp.full((2, 2), 500.0)}

    def first_update(clip_norm, grads):
        tx = make_optimizer(OptimizerConfig(warmup_steps=0, weight_decay=0.0, eps=1e3, clip_norm=clip_norm))
        return tx.update(grads, tx.init(params), params)[0]["w"]

    np.testing.assert_allclose(first_update(1.0, big), first_update(1.0, bigger), rtol=1e-6)
    assert not np.allclose(first_update(0.0, big), first_update(0.0, bigger))


@pytest.mark.parametrize(
    "bad, message",
    [({"lr": 0.0}, "lr"), ({"warmup_steps": 50, "decay_steps": 50}, "warmup_steps"), ({"min_lr_ratio": 2.0}, "min_lr_ratio")],
)
def test_bad_config_names_the_field(bad, message):
    with pytest.raises(ConfigError, match=message):
        make_optimizer(OptimizerConfig(**bad))
