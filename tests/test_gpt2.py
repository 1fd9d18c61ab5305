"""GPT-2: Hugging Face parity (import and export), masking, KV cache, sharding, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrl.core.config import ConfigError, MeshConfig
from jaxrl.core.mesh import make_mesh, shard_batch, shard_state
from jaxrl.models import onednn
from jaxrl.models.gpt2 import GPT2, GPT2Config, KVCache, from_pretrained, save_pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_VOCAB = 50257
PAD = HF_VOCAB  # from_pretrained appends the pad row after HF's vocabulary


def small_hf_model():
    """A random-init HF GPT-2 small enough for CPU tests, with the real vocabulary size."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=HF_VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.1, attn_implementation="eager",
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_gpt2")
    small_hf_model().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def model(hf_dir):
    return from_pretrained(hf_dir)


def random_batch(seed, batch=3, length=12, padding=None):
    """Tokens [B,T] and mask; padding = "left" | "right" | None; pad slots hold PAD."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, HF_VOCAB, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for row, n_pad in enumerate([0, 3, 7][:batch] if padding else []):
        if padding == "left":
            mask[row, :n_pad] = 0
        else:
            mask[row, length - n_pad :] = 0
    return np.where(mask == 1, tokens, PAD), mask


def hf_logits(hf_model, tokens, mask):
    """HF logits with the same position ids as ours (count of real tokens before)."""
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.tensor(np.where(mask == 1, tokens, 0), dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.numpy()


def max_real_diff(ours, theirs, mask):
    """Max |diff| over real positions and HF's vocabulary (our pad logit has no HF twin)."""
    diff = np.abs(np.asarray(ours)[..., :HF_VOCAB] - theirs)
    return diff[mask == 1].max()


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_logits_match_hugging_face(model, hf_model, padding):
    tokens, mask = random_batch(seed=1, padding=padding)
    assert max_real_diff(model(jnp.asarray(tokens), jnp.asarray(mask)), hf_logits(hf_model, tokens, mask), mask) <= 1e-4


def test_pad_row_added_on_load_and_trimmed_on_export(model, hf_model, tmp_path):
    assert model.cfg.vocab_size == HF_VOCAB + 1 and model.cfg.pad_id == PAD
    save_pretrained(model, tmp_path)
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert exported.transformer.wte.weight.shape == (HF_VOCAB, 32)
    tokens, mask = random_batch(seed=2, padding="left")
    assert max_real_diff(model(jnp.asarray(tokens), jnp.asarray(mask)), hf_logits(exported, tokens, mask), mask) <= 1e-4
    reloaded = from_pretrained(tmp_path)
    np.testing.assert_array_equal(reloaded.wte.embedding[...][:HF_VOCAB], model.wte.embedding[...][:HF_VOCAB])


def test_loads_pytorch_model_bin(hf_model, tmp_path):
    # The legacy format (transformers 5 no longer writes it): a pickled state dict.
    hf_model.config.save_pretrained(tmp_path)
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    tokens, mask = random_batch(seed=3)
    assert max_real_diff(from_pretrained(tmp_path)(jnp.asarray(tokens)), hf_logits(hf_model, tokens, mask), mask) <= 1e-4


def test_from_pretrained_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)


def test_padding_is_never_attended(model):
    tokens, mask = random_batch(seed=4, padding="left")
    logits = model(jnp.asarray(tokens), jnp.asarray(mask))
    # Pad ids are masked even without an explicit mask.
    np.testing.assert_allclose(model(jnp.asarray(tokens))[mask == 1], logits[mask == 1], atol=1e-6)
    # Whatever sits in a masked slot cannot change the real positions.
    other = np.where(mask == 1, tokens, np.random.default_rng(5).integers(0, HF_VOCAB, tokens.shape))
    np.testing.assert_allclose(model(jnp.asarray(other), jnp.asarray(mask))[mask == 1], logits[mask == 1], atol=1e-6)


def test_kv_cache_decode_equals_full_forward(model):
    tokens, mask = random_batch(seed=6, length=10, padding="left")
    full = model(jnp.asarray(tokens), jnp.asarray(mask))
    cache = KVCache.empty(model.cfg, batch_size=3, max_len=16)
    pieces = []
    for start, stop in [(0, 6), (6, 7), (7, 10)]:  # a prefill, then steps of 1 and 3 tokens
        logits, cache = model(jnp.asarray(tokens[:, start:stop]), jnp.asarray(mask[:, start:stop]), cache=cache)
        pieces.append(logits)
    assert int(cache.index) == 10
    np.testing.assert_allclose(np.concatenate(pieces, axis=1)[mask == 1], full[mask == 1], atol=1e-5)


def test_presets_have_gpt2_parameter_counts():
    def count(name):
        model = nnx.eval_shape(lambda: GPT2(GPT2Config.preset(name), rngs=nnx.Rngs(0)))
        return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    # OpenAI's counts (tied embeddings) plus our pad row and the rows that pad the
    # vocabulary to 50304 = 393 x 128 (so it shards over `tensor`): 47 rows of n_embd.
    assert count("124M") == 124_439_808 + 47 * 768
    assert count("350M") == 354_823_168 + 47 * 1024
    with pytest.raises(ConfigError, match="choose one of"):
        GPT2Config.preset("7B")
    with pytest.raises(ConfigError, match="divisible"):
        GPT2Config(n_embd=100, n_head=3)


def test_init_scales_residual_projections():
    cfg = GPT2Config.preset("tiny", vocab_size=512, pad_id=511, n_layer=8)
    model = GPT2(cfg, rngs=nnx.Rngs(0))
    assert abs(float(jnp.std(model.h[0].mlp.c_fc.kernel[...])) - 0.02) < 2e-3
    assert abs(float(jnp.std(model.h[0].mlp.c_proj.kernel[...])) - 0.02 / 4) < 5e-4  # 1/sqrt(2*8)


def test_remat_bf16_and_dropout(hf_dir):
    tokens, mask = random_batch(seed=7, padding="right")
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)

    def grads(model):
        graphdef, params = nnx.split(model)
        return jax.grad(lambda p: nnx.merge(graphdef, p)(tokens, mask).mean())(params)

    plain, remat = grads(from_pretrained(hf_dir)), grads(from_pretrained(hf_dir, remat=True))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), plain, remat)

    f32 = from_pretrained(hf_dir)(tokens, mask)
    bf16 = from_pretrained(hf_dir, dtype="bfloat16", param_dtype="bfloat16")
    assert bf16.h[0].attn.c_attn.kernel[...].dtype == jnp.bfloat16
    assert np.abs(bf16(tokens, mask) - f32)[mask == 1].max() < 0.1

    dropout = from_pretrained(hf_dir, dropout=0.5)
    key = jax.random.key(0)
    a = dropout(tokens, mask, deterministic=False, rngs=key)
    np.testing.assert_array_equal(a, dropout(tokens, mask, deterministic=False, rngs=key))
    assert not np.allclose(a, dropout(tokens, mask, deterministic=False, rngs=jax.random.key(1)))
    np.testing.assert_allclose(dropout(tokens, mask), f32, atol=1e-6)
    # Remat recomputes the same dropout masks in the backward pass.
    remat_dropout = from_pretrained(hf_dir, dropout=0.5, remat=True)
    np.testing.assert_allclose(remat_dropout(tokens, mask, deterministic=False, rngs=key), a, atol=1e-6)
    with pytest.raises(ValueError, match="rngs"):
        dropout(tokens, mask, deterministic=False)


def test_sharded_forward_matches_single_device(model):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    graphdef, params = nnx.split(model)
    sharded = shard_state(params, mesh)
    kernel = sharded["h"][0]["mlp"]["c_fc"]["kernel"][...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")  # [out, in]
    tokens, mask = random_batch(seed=8, batch=4, padding="left")
    batch = shard_batch({"tokens": tokens, "mask": mask}, mesh)
    logits = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b["tokens"], b["mask"]))(sharded, batch)
    np.testing.assert_allclose(logits, model(jnp.asarray(tokens), jnp.asarray(mask)), atol=1e-5)


@pytest.mark.parametrize("numerics", [
    {}, pytest.param({"dtype": "bfloat16", "matmul": "onednn"}, id="onednn",
                     marks=pytest.mark.skipif(onednn.unavailable() is not None,
                                              reason=str(onednn.unavailable())))])
def test_training_reduces_loss_on_a_batch(numerics):
    cfg = GPT2Config.preset("tiny", vocab_size=64, pad_id=63, n_layer=2, n_embd=32, n_positions=32,
                            **numerics)
    graphdef, params = nnx.split(GPT2(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(0), (4, 32), 0, 63)
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    losses = []
    for _ in range(40):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[0] > np.log(63) - 0.5 and losses[-1] < 0.5 * losses[0]


def test_pad_is_never_predicted():
    cfg = GPT2Config.preset("tiny", vocab_size=64, pad_id=63, n_layer=1, n_embd=16, n_head=2,
                            n_positions=16)
    model = GPT2(cfg, rngs=nnx.Rngs(0))
    logits = model(jax.random.randint(jax.random.key(1), (2, 8), 0, 63))
    probs = jax.nn.softmax(logits, axis=-1)
    assert float(probs[..., 63].max()) == 0.0
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_vocab_padded_to_128_is_never_predicted_and_shards_over_tensor():
    from jaxrl.core.config import MeshConfig
    from jaxrl.core.mesh import make_mesh, state_shardings

    cfg = GPT2Config.preset("tiny", n_layer=1, n_embd=16, n_head=2, n_positions=8)
    assert (cfg.vocab_size, cfg.embedding_rows) == (50258, 50304)
    model = GPT2(cfg, rngs=nnx.Rngs(0))
    logits = model(jnp.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, 50304)
    never = np.asarray(logits)[..., [cfg.pad_id, *range(cfg.vocab_size, 50304)]]
    assert (never == -1e9).all()
    assert np.asarray(jnp.argmax(logits, -1) < cfg.pad_id).all()

    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    wte = state_shardings(nnx.state(model, nnx.Param), mesh)["wte"]["embedding"].get_value()
    assert tuple(wte.spec) == ("tensor", "fsdp")  # 50258 rows alone would not split over 2
