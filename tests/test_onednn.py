"""oneDNN's bf16 matmul (`jaxrl.models.onednn`) and GPT-2's `matmul: onednn`."""

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl.core.config import ConfigError, MeshConfig
from jaxrl.core.mesh import make_mesh, shard_batch, shard_state
from jaxrl.models import onednn
from jaxrl.models.gpt2 import GPT2, GPT2Config, KVCache

X86_LINUX = sys.platform == "linux" and platform.machine() == "x86_64"
UNAVAILABLE = onednn.unavailable()
needs_onednn = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


def bf16(x):
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def test_the_extension_is_built_where_its_wheel_exists():
    """On x86-64 Linux the only acceptable reason for no oneDNN matmul is the CPU's ISA."""
    if not X86_LINUX:
        assert UNAVAILABLE is not None and "matmul: xla" in UNAVAILABLE
    else:
        assert UNAVAILABLE is None or "has no bf16 matmul for this CPU" in UNAVAILABLE, UNAVAILABLE


@needs_onednn
def test_matmul_and_its_gradients_equal_the_bf16_rounded_product(monkeypatch):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, (3, 5, 64)), jax.random.normal(kw, (48, 64))
    g = jax.random.normal(kg, (3, 5, 48))

    def reference(x, w):  # f32 products of bf16-rounded operands
        return jnp.einsum("...k,nk->...n", bf16(x), bf16(w), precision="highest")

    np.testing.assert_allclose(jax.jit(onednn.matmul_bf16)(x, w), reference(x, w), atol=1e-4)
    ours = jax.jit(jax.grad(lambda x, w: jnp.sum(onednn.matmul_bf16(x, w) * g), (0, 1)))(x, w)
    # The cotangent enters the backward products rounded to bf16, as under torch's autocast.
    theirs = jax.grad(lambda x, w: jnp.sum(reference(x, w) * bf16(g)), (0, 1))(x, w)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-3)
    assert onednn.matmul_bf16(x[:0], w).shape == (0, 5, 48)
    with monkeypatch.context() as patch:  # on a TPU / GPU host, before XLA fails to compile it
        patch.setattr(jax, "default_backend", lambda: "tpu")
        with pytest.raises(ValueError, match="CPU backend only.*tpu: set matmul: xla"):
            onednn.matmul_bf16(x, w)
    with pytest.raises(ValueError, match=r"w must be \[N, 64\]"):
        onednn.matmul_bf16(x, w.T)
    assert "bf16" in onednn.implementation(1024, 3072, 768) or "amx" in onednn.implementation(
        1024, 3072, 768)


def tiny(**overrides):
    return GPT2Config.preset("tiny", vocab_size=64, pad_id=63, n_layer=2, n_embd=32,
                             n_positions=32, dtype="bfloat16", **overrides)


@needs_onednn
def test_gpt2_on_onednn_matches_xla_bf16_decodes_and_shards():
    """(Training on it: test_gpt2.py::test_training_reduces_loss_on_a_batch[onednn].)"""
    tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, 63)
    ours, xla = GPT2(tiny(matmul="onednn"), rngs=nnx.Rngs(0)), GPT2(tiny(), rngs=nnx.Rngs(0))
    logits = ours(tokens)
    assert logits.dtype == jnp.float32
    assert float(jnp.abs(logits - xla(tokens)).max()) < 0.05  # bf16 roundings in other places

    # Decoding with the KV cache reads the same products one token at a time.
    cache = KVCache.empty(ours.cfg, batch_size=8, max_len=16)
    first, cache = ours(tokens[:, :12], cache=cache)
    last, cache = ours(tokens[:, 12:], cache=cache)
    np.testing.assert_allclose(jnp.concatenate([first, last], 1), logits, atol=0.05)

    # On a mesh XLA runs the opaque call replicated: the same logits, sharded or not.
    graphdef, params = nnx.split(ours)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    batch = shard_batch({"tokens": np.asarray(tokens)}, mesh)
    sharded = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b["tokens"]))(shard_state(params, mesh), batch)
    np.testing.assert_allclose(sharded, logits, atol=0.02)


def test_config_names_what_matmul_onednn_needs():
    with pytest.raises(ConfigError, match="choose 'xla' or 'onednn'"):
        tiny(matmul="mkl")
    with pytest.raises(ConfigError, match="set dtype: bfloat16"):
        GPT2Config.preset("tiny", matmul="onednn")
    if not X86_LINUX:
        return
    # A CPU without AVX-512 (oneDNN has no bf16 matmul there), emulated by capping its ISA.
    code = ("from jaxrl.models.gpt2 import GPT2Config\n"
            "GPT2Config.preset('tiny', dtype='bfloat16', matmul='onednn')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "DNNL_MAX_CPU_ISA": "AVX2"}, timeout=120)
    assert out.returncode != 0
    assert "ConfigError" in out.stderr and "no bf16 matmul for this CPU" in out.stderr
    assert "set matmul: xla" in out.stderr
