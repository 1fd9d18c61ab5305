"""HOPE mechanisms: causality, CMS cadence and flush, write gradients, per-example state, dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrl.core.config import MeshConfig
from jaxrl.core.mesh import make_mesh, shard_batch
from jaxrl.core.step import compile_step
from jaxrl.core.checkpoint import Checkpointer
from jaxrl.models.cms import CMS, CMSConfig
from jaxrl.models.hope import HOPE, HopeConfig, generate
from jaxrl.models.titans import MemoryConfig, SelfModTitans, TitansMemory, soft_clamp
from jaxrl.recipes import sft, sft_hope

D, VOCAB, PAD = 16, 64, 63
MEMORY = MemoryConfig(heads=2, depth=2, chunk_size=4, unit_size=2, memory_chunk_size=8)
KW = dict(dtype=jnp.float32, param_dtype=jnp.float32)


def hope_config(**overrides) -> HopeConfig:
    base = dict(vocab_size=VOCAB, pad_id=PAD, n_embd=D, n_layer=2, n_head=2, memory=MEMORY,
                cms=CMSConfig(periods=(4, 8)))
    return HopeConfig(**{**base, **overrides})


def build(kind: str, writes="differentiable", memory=MEMORY, cms=CMSConfig(periods=(3, 4))):
    rngs = nnx.Rngs(0)
    if kind == "titans":
        return TitansMemory(memory, D, writes=writes, rngs=rngs, **KW)
    if kind == "titans_chunk_gates":
        memory = dataclasses.replace(memory, gate_granularity="chunk", read_after_write=True)
        return TitansMemory(memory, D, writes=writes, rngs=rngs, **KW)
    if kind == "selfmod":
        return SelfModTitans(memory, D, writes=writes, rngs=rngs, **KW)
    return CMS(cms, D, writes=writes, rngs=rngs, **KW)


def pure(module):
    """module -> jitted f(params, x, real, fast) -> (y, fast'), params differentiable."""
    graphdef, params = nnx.split(module)
    return params, jax.jit(lambda p, x, real, fast: nnx.merge(graphdef, p)(x, real, fast))


MODULES = ["titans", "titans_chunk_gates", "selfmod", "cms"]


@pytest.fixture(scope="module")
def modules():
    """kind -> (module, params, f): built and compiled once for the whole file."""
    out = {}
    for kind in MODULES:
        module = build(kind)
        out[kind] = (module, *pure(module))
    return out


TEACH = CMSConfig(periods=(4, 8), objective="teach", lr=0.5)
LMS = {"selfmod": dict(mixer="selfmod"), "attention": dict(mixer="attention"),
       "titans": dict(mixer="titans"), "selfmod_teach": dict(mixer="selfmod", cms=TEACH)}


@pytest.fixture(scope="module")
def lms():
    """name -> (model, params, jitted f(params, tokens) -> logits), one per `LMS` config."""
    out = {}
    for name, overrides in LMS.items():
        model = HOPE(hope_config(**overrides), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        out[name] = (model, params, jax.jit(lambda p, t, g=graphdef: nnx.merge(g, p)(t)))
    return out


def token_batch(T=10):
    """Row 0: random tokens; row t+1: row 0 with token t changed (one compiled shape for all)."""
    tokens = jax.random.randint(jax.random.key(2), (T,), 0, PAD)
    return jnp.stack([tokens] + [tokens.at[t].set((tokens[t] + 1) % PAD) for t in range(T)])


def perturbed_batch(x, positions):
    """Row 0 is x; row i+1 is x with position positions[i] changed."""
    rows = [x]
    for t in positions:
        rows.append(x.at[t].add(1.0))
    return jnp.stack(rows)


@pytest.mark.parametrize("kind", MODULES)
def test_output_t_ignores_inputs_after_t(modules, kind):
    module, params, f = modules[kind]
    T = 11  # not a multiple of any chunk: the padded tail is exercised too
    x = jax.random.normal(jax.random.key(1), (T, D))
    positions = list(range(T))
    batch = perturbed_batch(x, positions)
    y, _ = f(params, batch, jnp.ones(batch.shape[:2], bool), module.init_fast(len(batch)))
    y = np.asarray(y)
    for i, t in enumerate(positions):
        np.testing.assert_allclose(y[i + 1, :t], y[0, :t], atol=1e-6, err_msg=f"{kind}, t={t}")
        assert np.abs(y[i + 1, t:] - y[0, t:]).max() > 1e-6, f"{kind}: token {t} has no effect"


@pytest.mark.parametrize("name", LMS)
def test_lm_logits_t_ignore_tokens_after_t(lms, name):
    """With the teach objective too: a write after a chunk uses its targets, up to the next
    chunk's first token, and only later positions read it."""
    _, params, f = lms[name]
    batch = token_batch()
    logits = np.asarray(f(params, batch))
    for t in range(batch.shape[1]):
        np.testing.assert_allclose(logits[t + 1, :t], logits[0, :t], atol=1e-5)
        assert np.abs(logits[t + 1, t:] - logits[0, t:]).max() > 1e-6


def test_cms_counts_tokens_across_calls():
    """Calls of 3, 3 and 2 tokens with period 4 give the state and outputs of one 8-token call."""
    module = build("cms", cms=CMSConfig(periods=(4,), flush_partial=False))
    params, f = pure(module)
    x = jax.random.normal(jax.random.key(3), (1, 8, D))
    real = jnp.ones((1, 8), bool)
    y_once, once = f(params, x, real, module.init_fast(1))
    fast, ys, init = module.init_fast(1), [], module.init_fast(1).weights[0][0]
    changed = []
    for lo, hi in [(0, 3), (3, 6), (6, 8)]:
        y, fast = f(params, x[:, lo:hi], real[:, lo:hi], fast)
        ys.append(y)
        changed.append(bool(jnp.any(fast.weights[0][0] != init)))
        init = fast.weights[0][0]
    assert changed == [False, True, True]  # boundaries at tokens 4 and 8, not at call ends
    assert int(fast.count[0]) == 8
    np.testing.assert_allclose(jnp.concatenate(ys, 1), y_once, atol=1e-5)
    for a, b in zip(jax.tree.leaves(fast.weights), jax.tree.leaves(once.weights)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert all(float(jnp.abs(p).max()) == 0.0 for p in jax.tree.leaves(fast.pending))


def test_cms_partial_chunk_is_flushed_at_sequence_end():
    x = jax.random.normal(jax.random.key(4), (1, 6, D))  # one whole chunk of 4, then 2 tokens
    real = jnp.ones((1, 6), bool)
    states = {}
    for flush in (False, True):
        module = build("cms", cms=CMSConfig(periods=(4,), flush_partial=flush))
        params, f = pure(module)
        _, states[flush] = f(params, x, real, module.init_fast(1))
    kept, flushed = states[False], states[True]
    assert float(jnp.abs(kept.pending[0][0]).max()) > 0  # 2 tokens wait for their chunk
    assert float(jnp.abs(flushed.pending[0][0]).max()) == 0
    update = soft_clamp(kept.pending[0], CMSConfig().max_grad_norm)
    step = jax.tree.map(lambda w, g: w - CMSConfig().lr * g, kept.weights[0], update)
    for a, b in zip(jax.tree.leaves(step), jax.tree.leaves(flushed.weights[0])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def init_leaves(module):
    """The module's meta-learned initial fast weights (slow params), as a list of Params."""
    inits = module.init_memories if isinstance(module, SelfModTitans) else module.init_weights
    return jax.tree.leaves(nnx.state(inits, nnx.Param))


@pytest.mark.parametrize("kind", ["titans", "selfmod", "cms"])
def test_initial_state_gets_gradients_through_writes_only_when_differentiable(kind):
    """d <R, final weights> / d W0 is R exactly when writes are stop-gradient, more otherwise."""
    x = jax.random.normal(jax.random.key(5), (1, 8, D))
    real = jnp.ones((1, 8), bool)
    grads = {}
    for writes in ("differentiable", "stop_gradient"):
        module = build(kind, writes=writes)
        graphdef, params = nnx.split(module)

        def probe(p):  # <R, final fast weights>, from the initial state the params hold
            m = nnx.merge(graphdef, p)
            _, fast = m(x, real, m.init_fast(1))
            leaves = jax.tree.leaves(fast.memories if kind == "selfmod" else fast.weights)
            return sum(jnp.sum(jnp.cos(jnp.arange(w.size).reshape(w.shape)) * w) for w in leaves)

        grad = nnx.merge(graphdef, jax.jit(jax.grad(probe))(params))
        grads[writes] = init_leaves(grad)
        if kind == "titans":  # theta/eta/alpha act through the writes alone
            gate_grad = float(jnp.abs(grad.gates.kernel[...]).max())
            assert (gate_grad > 1e-6) if writes == "differentiable" else (gate_grad == 0.0)
    for d, s in zip(grads["differentiable"], grads["stop_gradient"]):
        r = np.cos(np.arange(s.size).reshape(s.shape))
        np.testing.assert_allclose(s[...], r, atol=1e-5)  # identity: the write is a constant
        assert np.abs(d[...] - r).max() > 1e-4  # the write's own Jacobian contributes


def test_each_example_has_its_own_fast_state(lms):
    """Row 0's logits do not depend on its batch neighbours, and equal the row run alone."""
    model, params, f = lms["selfmod"]
    batch = token_batch()
    others = jax.random.randint(jax.random.key(8), batch[1:].shape, 0, PAD)
    mixed = f(params, batch.at[1:].set(others))
    np.testing.assert_allclose(mixed[0], f(params, batch)[0], atol=1e-5)
    alone = jax.jit(lambda t: model(t))(batch[:1])
    np.testing.assert_allclose(mixed[:1], alone, atol=1e-5)


def test_fast_state_is_float32_under_bfloat16_compute():
    model = HOPE(hope_config(dtype="bfloat16", param_dtype="bfloat16", n_layer=1),
                 rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(9), (2, 9), 0, PAD)
    graphdef, params = nnx.split(model)
    logits, fast = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t, fast=nnx.merge(graphdef, p)
                                                               .init_fast(2)))(params, tokens)
    assert bool(jnp.isfinite(logits).all())
    floats = [x for x in jax.tree.leaves(fast) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)


def test_teach_pass_at_zero_lr_gives_the_one_call_forward():
    """The online teach pass feeds the mixer 4-token pieces; with the conv history carried (a
    random conv here) and M_memory published on its 8-token period of the whole sequence, its
    logits at cms.lr=0 are the plain forward's. T=13 ends in a short chunk."""
    tokens = jax.random.randint(jax.random.key(15), (2, 13), 0, PAD)
    cms = {obj: dataclasses.replace(TEACH, lr=0.0, objective=obj) for obj in ("local", "teach")}
    models = {obj: HOPE(hope_config(n_layer=1, cms=c), rngs=nnx.Rngs(0)) for obj, c in cms.items()}
    conv = models["local"].h[0].mixer.conv.kernel
    conv.set_value(jax.random.normal(jax.random.key(16), conv.shape))
    nnx.update(models["teach"], nnx.state(models["local"]))
    logits = jax.jit(lambda t: {k: m(t)[..., :PAD] for k, m in models.items()})(tokens)
    np.testing.assert_allclose(logits["teach"], logits["local"], atol=1e-6)


def test_teach_write_steps_along_the_chunk_loss_gradient_and_lowers_it():
    """One 4-token chunk, period 4. The level loss sum ||pred - sg(pred - delta)||^2 has weight
    gradient 2 J^T delta = 2 d(chunk loss)/d(weights): the write must be -lr * clamp(that), the
    gradient taken here through a plain forward at cms.lr=0 (no teach code); replaying the
    chunk at the written weights lowers its loss."""
    tokens = jax.random.randint(jax.random.key(17), (1, 4), 0, PAD)
    level_cfg = dict(periods=(4,), lr=0.05)
    teach = HOPE(hope_config(mixer="attention", n_layer=1,
                             cms=CMSConfig(objective="teach", **level_cfg)), rngs=nnx.Rngs(0))
    plain = HOPE(hope_config(mixer="attention", n_layer=1,
                             cms=CMSConfig(**{**level_cfg, "lr": 0.0})), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(plain)

    def chunk_loss(level_weights):  # mean CE of the chunk's 3 pairs, the level at these weights
        m = nnx.merge(graphdef, params, copy=True)
        for w, value in zip(m.h[0].cms.init_weights[0], level_weights):
            w.set_value(value)
        logits = m(tokens)[0, :-1]
        picked = jnp.take_along_axis(logits, tokens[0, 1:, None], axis=-1)[:, 0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)

    start = tuple(w[...] for w in plain.h[0].cms.init_weights[0])
    loss, grad = jax.jit(jax.value_and_grad(chunk_loss))(start)
    _, fast = jax.jit(lambda t: teach(t, fast=teach.init_fast(1)))(tokens)
    written = tuple(w[0] for w in fast.cms[0].weights[0])
    expected = soft_clamp(jax.tree.map(lambda g: 2.0 * g, grad), CMSConfig().max_grad_norm)
    for w, w0, g in zip(written, start, expected):
        assert float(jnp.abs(g).max()) > 0
        np.testing.assert_allclose(w - w0, -0.05 * g, atol=1e-7)
    assert float(jax.jit(chunk_loss)(written)) < float(loss) - 1e-4


@pytest.mark.parametrize("kind", ["titans", "selfmod", "cms"])
def test_sequence_shorter_than_a_chunk_still_writes(modules, kind):
    module, params, f = modules[kind]
    x = jax.random.normal(jax.random.key(10), (1, 2, D))  # chunk 4 (mixers), periods 3, 4 (CMS)
    fast0 = module.init_fast(1)
    _, fast = f(params, x, jnp.ones((1, 2), bool), fast0)
    before = jax.tree.leaves(fast0.memories if kind == "selfmod" else fast0.weights)
    after = jax.tree.leaves(fast.memories if kind == "selfmod" else fast.weights)
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(after, before))


def test_deep_memory_over_eight_chunks_stays_finite():
    memory = dataclasses.replace(MEMORY, depth=4)
    module = build("titans", memory=memory)
    graphdef, params = nnx.split(module)
    x = 3.0 * jax.random.normal(jax.random.key(11), (1, 8 * memory.chunk_size, D))
    real = jnp.ones(x.shape[:2], bool)

    def loss(p):
        y, fast = nnx.merge(graphdef, p)(x, real, module.init_fast(1))
        return jnp.mean(y ** 2), fast

    (value, fast), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    leaves = [value, *jax.tree.leaves(fast), *jax.tree.leaves(grad)]
    assert all(bool(jnp.isfinite(leaf).all()) for leaf in leaves)


SHARDED = {  # HopeConfig overrides: HOPE's own mixer; the teach pass with a persistent memory
    "selfmod": dict(mixer="selfmod"),
    "attention_teach_persistent": dict(mixer="attention",
                                       cms=dataclasses.replace(TEACH, state="persistent")),
}


@pytest.mark.parametrize("name", SHARDED)
def test_sharded_loss_equals_one_device(corpus_batch, name):
    """Fast state is per example (written inside the forward; a persistent memory is a batch
    mean, an all-reduce), so 8 devices change nothing.

    One initial state (built once, on one device) is laid out on both meshes; the optimizer
    is plain SGD because only two steps' losses and gradient norms are compared."""
    meshes = [make_mesh(MeshConfig(data=8)), make_mesh(MeshConfig(data=1), jax.devices()[:1])]
    cfg = hope_config(n_layer=1, **SHARDED[name])
    tx = optax.sgd(1e-2)  # one object: it is static pytree metadata of the state
    inits = [sft_hope.initial_state(cfg, tx, 0, mesh) for mesh in meshes]
    state = inits[1]()
    losses = []
    for mesh, init in zip(meshes, inits):
        step = compile_step(sft_hope.train_step, mesh, init.shardings, donate=False)
        s, batch, seen = jax.device_put(state, init.shardings), shard_batch(corpus_batch, mesh), []
        for _ in range(2):  # the second step reads what the first wrote to a persistent memory
            s, metrics = step(s, batch, jax.random.key(0))
            seen += [float(metrics["loss"]), float(metrics["grad_norm"])]
        losses.append(seen)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_persistent_cms_memory_carries_across_steps_and_resumes_exactly(tmp_path, corpus_batch):
    """cms.state=persistent (teach objective): step 2 starts each row from step 1's batch-mean
    CMS state as an offset on the (updated) initial weights, which a fresh start does not; a
    checkpoint restored between the steps gives step 2 bit for bit."""
    cfg = hope_config(mixer="attention", n_layer=1,
                      cms=dataclasses.replace(TEACH, state="persistent"))
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    init = sft_hope.initial_state(cfg, optax.adam(1e-2), 0, mesh)
    step = compile_step(sft_hope.train_step, mesh, init.shardings, donate=False)
    halves = [shard_batch({k: v[rows] for k, v in corpus_batch.items()}, mesh)
              for rows in (slice(0, 4), slice(4, 8))]
    key = jax.random.key(0)
    s0 = init()
    s1, m1 = step(s0, halves[0], key)
    s2, m2 = step(s1, halves[1], key)
    _, fresh = step(s0, halves[1], key)
    assert abs(float(m2["loss"]) - float(fresh["loss"])) > 1e-4

    @jax.jit
    def reference(s0, s1):  # step 2's loss, the carried state built by hand
        m0, m1 = s0.model(), s1.model()
        b1, b2 = halves
        _, fast = m0(b1["tokens"], b1["attention_mask"], fast=m0.init_fast(4))
        start = m1.init_fast(4)
        levels = []
        for (w_in, w_out), i0, i1 in zip(fast.cms[0].weights, m0.h[0].cms.init_weights,
                                         m1.h[0].cms.init_weights):
            levels.append(tuple(jnp.broadcast_to(new[...] + w.mean(0) - old[...], w.shape)
                                for w, old, new in zip((w_in, w_out), i0, i1)))
        cms = start.cms[0].replace(weights=tuple(levels), count=fast.cms[0].count)
        logits, _ = m1(b2["tokens"], b2["attention_mask"], fast=start.replace(cms=(cms,)))
        return optax.softmax_cross_entropy_with_integer_labels(logits, b2["targets"]).mean()

    np.testing.assert_allclose(float(m2["loss"]), float(reference(s0, s1)), rtol=1e-5)
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, s1)
    restored, _, _ = ckpt.restore(init.abstract)
    s2_again, m2_again = step(restored, halves[1], key)
    assert float(m2_again["loss"]) == float(m2["loss"])
    for a, b in zip(jax.tree.leaves(s2_again.extra), jax.tree.leaves(s2.extra)):
        np.testing.assert_array_equal(a, b)
    assert all(np.isfinite(float(m["loss"])) for m in (m1, m2))


@pytest.fixture
def corpus_batch():
    rng = np.random.default_rng(0)
    window = rng.integers(0, PAD, (8, 13)).astype(np.int32)
    return {"tokens": window[:, :-1], "targets": window[:, 1:],
            "loss_mask": np.ones((8, 12), np.float32), "attention_mask": np.ones((8, 12), np.int32)}


def test_generate_continues_a_prompt(lms):
    model, _, _ = lms["attention"]
    prompt = jax.random.randint(jax.random.key(12), (2, 5), 0, PAD)
    out = jax.jit(lambda p, k: generate(model, p, k, max_new_tokens=4))(prompt, jax.random.key(0))
    assert out.shape == (2, 4) and bool(((out >= 0) & (out < PAD)).all())


@pytest.mark.parametrize("kind", MODULES)
def test_prefill_then_token_decode_gives_the_outputs_of_one_call(modules, kind):
    """A 5-token prompt (chunks 4, units 2, M_memory 8, CMS periods 3 and 4), then 6 tokens one
    at a time: every output equals the 11-token call's. Row 1 starts with 2 pad tokens."""
    module, params, f = modules[kind]
    graphdef = nnx.graphdef(module)
    x = jax.random.normal(jax.random.key(14), (2, 11, D))
    real = jnp.ones((2, 11), bool).at[1, :2].set(False)
    whole, _ = f(params, x, real, module.init_fast(2))

    @jax.jit
    def decoded(params):
        m = nnx.merge(graphdef, params)
        y, dec = m.prefill(x[:, :5], real[:, :5], m.init_fast(2))
        step = lambda dec, token: m.decode(*token, dec)[::-1]  # noqa: E731
        _, ys = jax.lax.scan(step, dec, (jnp.moveaxis(x[:, 5:], 1, 0), real[:, 5:].T))
        return jnp.concatenate([y, jnp.moveaxis(ys, 0, 1)], axis=1)

    np.testing.assert_allclose(decoded(params), whole, atol=1e-6)


DECODERS = {  # HopeConfig overrides of each decoder test
    "titans_chunk_gates": dict(mixer="titans", memory=dataclasses.replace(
        MEMORY, gate_granularity="chunk", read_after_write=True)),
    "selfmod": dict(mixer="selfmod"),
    "attention": dict(mixer="attention"),
}


@pytest.mark.parametrize("kind", DECODERS)
def test_recurrent_decode_gives_the_full_window_recompute(kind):
    """Greedy, prompt 6, 7 new tokens: the decode crosses mixer chunk (4), unit (2), M_memory (8)
    and CMS period (3, 8) boundaries from mid-chunk. Row 1's prompt is left-padded."""
    model = HOPE(hope_config(n_layer=1, cms=CMSConfig(periods=(3, 8)), **DECODERS[kind]),
                 rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(13), (2, 6), 0, PAD).at[1, :2].set(PAD)
    run = lambda recompute: generate(  # noqa: E731
        model, prompt, jax.random.key(0), max_new_tokens=7, temperature=0.0, recompute=recompute,
        return_logits=True)
    (tokens, logits), (ref_tokens, ref_logits) = jax.jit(lambda: (run(False), run(True)))()
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(logits[..., :PAD], ref_logits[..., :PAD], atol=1e-5)
