"""Corpus pipeline: tokenizer training, filters, dedup, restartable sharding, streaming Grain input, SFT on shards."""

import json
import pickle

import grain
import numpy as np
import pytest
import yaml
from tokenizers import Tokenizer as HFTokenizer

from conftest import TINY_SFT_OVERRIDES
from jaxrl.core.config import ConfigError
from jaxrl.data import corpus, shards, train_tokenizer
from jaxrl.data.__main__ import main as data_cli
from jaxrl.data.lm import LMDataConfig, WindowSource, load_lm_data
from jaxrl.data.manifest import FilterConfig, load_manifest
from jaxrl.data.sources import DataError
from jaxrl.data.tokenizer import EOT_TOKEN, Tokenizer
from jaxrl.launch import main as launch

WORDS = ("river stone light garden window paper silver morning castle forest engine music letter "
         "harbor winter candle bridge orange lantern meadow").split()


def _doc(rng, n_words=120):
    lines = [" ".join(rng.choice(WORDS, 12)) for _ in range(n_words // 12)]
    return "\n".join(line.capitalize() + "." for line in lines)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """Two sources: a JSONL of distinct documents with planted duplicates, and a directory of text files.

    Planted: one exact copy (across sources), one near copy (one word changed), and one
    document per filter (too short, mostly symbols, one line repeated).
    """
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("corpus")
    docs = [_doc(rng) for _ in range(40)]
    near = docs[3].split(" ")
    near[50] = "zebra"
    rows = docs + [" ".join(near), "tiny", "#$%&*!@ " * 20, "\n".join(["the same line again"] * 30)]
    (root / "rows.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    (root / "files").mkdir()
    for i in range(6):
        (root / "files" / f"{i}.txt").write_text(_doc(rng, 240))
    (root / "files" / "copy.txt").write_text(docs[7])  # exact duplicate of a JSONL row
    return root, docs, " ".join(near)


def _manifest(root, tmp_path, **extra):
    data = {
        "data_dir": str(root),
        "sources": [{"name": "rows", "path": "rows.jsonl"},
                    {"name": "files", "path": "files/*.txt", "weight": 1.0}],
        "output": {"record_tokens": 64, "shard_chars": 3000, "val_fraction": 0.1},
        "workers": 1,
        **extra,
    }
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_manifest(path)


@pytest.fixture(scope="module")
def shard_dir(corpus_dir, tmp_path_factory):
    root, _, _ = corpus_dir
    tmp = tmp_path_factory.mktemp("shards")
    out = tmp / "out"
    corpus.process(_manifest(root, tmp), out, log=lambda *_: None)
    return out


def _stream(directory, split="train"):
    index = shards.read_index(directory)
    records = [np.frombuffer(r, index["dtype"]) for r in
               grain.sources.ArrayRecordDataSource([str(directory / f["file"]) for f in index["splits"][split]])]
    return np.concatenate(records)


# ---------------------------------------------------------------- tokenizer


def test_trained_tokenizer_round_trips_keeps_special_tokens_and_matches_hugging_face(corpus_dir, tmp_path):
    root, docs, _ = corpus_dir
    manifest = _manifest(root, tmp_path, train_tokenizer={"vocab_size": 300, "min_frequency": 2})
    tok = train_tokenizer.train(manifest, tmp_path / "tok", log=lambda *_: None)
    assert (tok.vocab_size, tok.eot_id, tok.pad_id) == (300, 298, 299)
    text = docs[0] + "\n\tÜnïcödé ✓ 日本"  # bytes never seen in training still encode
    ids = tok.encode(text)
    assert tok.decode(ids + [tok.eot_id, tok.pad_id]) == text + EOT_TOKEN  # EOT kept, pad dropped
    assert tok.decode(ids + [tok.eot_id], skip_special_tokens=True) == text
    assert len(ids) < len(text.encode()) / 2  # it learned merges
    assert ids == HFTokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json")).encode(text).ids
    assert pickle.loads(pickle.dumps(tok)) is Tokenizer.from_spec(str(tmp_path / "tok"))
    # Shards written with it carry it: the directory alone gives the ids' tokenizer.
    out = tmp_path / "shards"
    corpus.process(_manifest(root, tmp_path, tokenizer=str(tmp_path / "tok")), out, log=lambda *_: None)
    (tmp_path / "tok" / "tokenizer.json").unlink()
    data = _data(out, process_index=0, process_count=1)
    assert (data.tokenizer.vocab_size, data.tokenizer.eot_id) == (300, 298)
    assert docs[0] + EOT_TOKEN in data.tokenizer.decode(np.concatenate([_stream(out, s) for s in ("train", "val")]))


# ---------------------------------------------------------------- filters and dedup


def test_filters_name_the_heuristic_that_dropped_a_document():
    cfg = FilterConfig(min_chars=10, min_words_for_ratios=8)
    assert corpus.filter_reason("short", cfg) == "too_short"
    assert corpus.filter_reason("{}[]()<>;:" * 5 + " ab", cfg) == "symbols"
    assert corpus.filter_reason("\n".join(["same line here"] * 5 + ["one other line here"]), cfg) == "repeated_lines"
    assert corpus.filter_reason("buy now " * 20, cfg) == "repeated_ngrams"
    assert corpus.filter_reason("a perfectly ordinary sentence with several different words in it", cfg) is None
    assert corpus.filter_reason("x" * 50, FilterConfig(max_chars=40)) == "too_long"


def test_dedup_removes_planted_exact_and_near_duplicates(corpus_dir, shard_dir):
    root, docs, near = corpus_dir
    stats = json.loads((shard_dir / "stats.json").read_text())
    rows, files = stats["sources"]["rows"], stats["sources"]["files"]
    assert rows["read"] == 44 and rows["filtered"] == {"too_short": 1, "symbols": 1, "repeated_lines": 1}
    assert rows["near_duplicates"] == 1 and rows["exact_duplicates"] == 0
    assert files["exact_duplicates"] == 1 and files["after_dedup"] == 6
    assert stats["total"]["after_dedup"] == 40 + 6
    assert stats["total"]["train_docs"] + stats["total"]["val_docs"] == 46
    text = Tokenizer.gpt2().decode(np.concatenate([_stream(shard_dir, s) for s in ("train", "val")]))
    assert near not in text and text.count(docs[3]) == 1 and text.count(docs[7]) == 1
    assert all(d in text for d in docs)


def test_weights_repeat_or_subsample_documents(corpus_dir, tmp_path):
    root, _, _ = corpus_dir
    manifest = _manifest(root, tmp_path, sources=[{"name": "rows", "path": "rows.jsonl", "weight": 2.0},
                                                  {"name": "files", "path": "files/*.txt", "weight": 0.0}])
    stats = corpus.process(manifest, tmp_path / "out", log=lambda *_: None)
    assert stats["sources"]["rows"]["after_mix"] == 2 * 40
    assert stats["sources"]["files"]["after_mix"] == 0 and stats["sources"]["files"]["tokens"] == 0


# ---------------------------------------------------------------- shards


def test_shard_resume_skips_finished_shards_and_gives_the_same_output(corpus_dir, shard_dir, tmp_path):
    root, _, _ = corpus_dir
    out = tmp_path / "out"
    manifest = _manifest(root, tmp_path, workers=2)  # the process pool, resumed into the same bytes
    corpus.process(manifest, out, log=lambda *_: None)
    names = sorted(p.name for p in out.glob("*.array_record"))
    assert len(names) >= 4
    reference = {n: (out / n).read_bytes() for n in names}
    assert reference == {n: (shard_dir / n).read_bytes() for n in names}  # workers 1 == workers 2
    # An interrupted run: k shards done, one half-written, no index yet.
    k = 2
    kept = {n: (out / n).stat().st_mtime_ns for n in names[:k]}
    for n in names[k:]:
        (out / n).unlink()
    (out / f"{names[k]}.tmp").write_bytes(b"partial")
    (out / shards.INDEX).unlink()
    log = []
    corpus.process(manifest, out, log=log.append)
    assert f"[corpus] {k} shards already written, {len(names) - k} to go" in log
    assert {n: (out / n).stat().st_mtime_ns for n in names[:k]} == kept
    assert {n: (out / n).read_bytes() for n in names} == reference
    assert shards.read_index(out) == shards.read_index(shard_dir)
    with pytest.raises(ConfigError, match="different manifest"):
        corpus.process(_manifest(root, tmp_path, output={"record_tokens": 32}), out, log=lambda *_: None)


def test_shard_windows_equal_in_memory_windows_across_record_and_shard_boundaries(shard_dir):
    stream = _stream(shard_dir)
    src = shards.ShardWindowSource(shard_dir, "train", seq_len=50, pad_id=50257)  # 50 does not divide 64
    ref = WindowSource.from_documents([stream], seq_len=50, pad_id=50257, packing=True)
    assert len(src) == len(ref) and src.num_target_tokens == ref.num_target_tokens == len(stream) - 1
    for i in range(len(ref)):
        np.testing.assert_array_equal(src[i], ref[i])
    assert stream[-1] == Tokenizer.gpt2().eot_id


def _data(shard_dir, **kw):
    cfg = LMDataConfig(path=str(shard_dir), seq_len=16, batch_size=kw.pop("batch_size", 4), seed=3)
    cfg.validate()
    return load_lm_data(cfg, **kw)


def test_streaming_resume_is_bitwise(shard_dir):
    data = _data(shard_dir, process_index=0, process_count=1)
    it = data.train_iterator()
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    resumed = data.train_iterator()
    resumed.set_state(state)
    for want, got in zip(expected, (next(resumed) for _ in range(5))):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])
            assert want[key].dtype == got[key].dtype


def test_hosts_read_disjoint_slices_that_cover_every_window(shard_dir):
    hosts = [_data(shard_dir, batch_size=2, process_index=p, process_count=2) for p in range(2)]
    n = len(hosts[0].train)
    seen = []
    for p, data in enumerate(hosts):
        it = data.train_iterator()
        rows = [next(it) for _ in range((n - p + 1) // 2)]  # host p holds epoch positions p, p+2, ...
        seen.append({tuple(np.concatenate([b["tokens"][0], b["targets"][0, -1:]])) for b in rows})
    everything = {tuple(hosts[0].train[i]) for i in range(n)}
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == everything


def test_shard_dir_validation_uses_its_own_split_and_checks_the_tokenizer(shard_dir, tmp_path):
    data = _data(shard_dir, process_index=0, process_count=1)
    assert data.tokenizer.name == "gpt2" and data.val.split == "val"
    (tmp_path / "tok").mkdir()
    with pytest.raises(DataError, match="shards hold ids of tokenizer 'gpt2'"):
        _data(shard_dir, tokenizer=_other_tokenizer(tmp_path / "tok"), process_index=0, process_count=1)
    with pytest.raises(ConfigError, match="packing=true"):
        LMDataConfig(path=str(shard_dir), packing=False).validate()


def _other_tokenizer(directory):
    """A 2-merge BPE, trained on a tiny text, to stand for any tokenizer other than the shards'."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["ab ab ab"], trainers.BpeTrainer(vocab_size=258, show_progress=False,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.add_special_tokens([EOT_TOKEN, "<|pad|>"])
    hf.save(str(directory / "tokenizer.json"))
    return Tokenizer.load(directory)


def test_sft_trains_on_a_shard_dir(shard_dir, tmp_path):
    rc = launch(["sft_gpt2_shakespeare", f"data.path={shard_dir}", f"run.dir={tmp_path / 'run'}",
                 "loop.steps=2", "loop.eval_every=2", *TINY_SFT_OVERRIDES])
    assert rc == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["steps"] == 2 and np.isfinite(result["val_loss"])


# ---------------------------------------------------------------- bad input


def test_malformed_manifest_names_the_key_and_the_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("sources:\n  - {name: a, path: x.txt, wieght: 2}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'sources\[0\].wieght'.*Did you mean 'sources\[0\].weight'"):
        load_manifest(path)
    assert data_cli(["process", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "config error:" in capsys.readouterr().err and not (tmp_path / "out").exists()
    path.write_text("sources:\n  - {name: a, path: x.txt}\nfilter: {max_symbol_ratio: 2}\n")
    with pytest.raises(ConfigError, match="bad.yaml: filter.max_symbol_ratio must be in"):
        load_manifest(path)
    path.write_text(f"data_dir: {tmp_path}\nsources:\n  - {{name: a, path: missing/*.txt}}\n")
    with pytest.raises(ConfigError, match="source 'a'.*missing"):
        corpus.process(load_manifest(path), tmp_path / "out")


def test_malformed_row_names_the_file_and_line(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    path = tmp_path / "m.yaml"
    path.write_text(f"data_dir: {tmp_path}\nworkers: 1\nsources:\n  - {{name: a, path: rows.jsonl}}\n")
    with pytest.raises(DataError, match=r"rows.jsonl:2: malformed JSON"):
        corpus.process(load_manifest(path), tmp_path / "out")
    (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: no field 'text' \(fields: body\)"):
        corpus.process(load_manifest(path), tmp_path / "out2")
