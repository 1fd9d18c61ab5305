"""Data readers and the Grain LM pipeline: windows, masks, determinism, exact resume, sharding."""

import json

import numpy as np
import pytest

from jaxrl.core.config import ConfigError
from jaxrl.data import lm, sources
from jaxrl.data.lm import LMDataConfig, WindowSource, batch_from_windows, eval_batches, train_dataset
from jaxrl.data.sources import DataError
from jaxrl.data.tokenizer import Tokenizer

PAD = 50257
EOT = 50256


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.gpt2()


def _docs(lengths, start=0):
    """Synthetic token documents with distinct ids, each ending in EOT."""
    docs, next_id = [], start
    for n in lengths:
        docs.append(np.array([*range(next_id, next_id + n - 1), EOT], dtype=np.int32))
        next_id += n - 1
    return docs


def _rows(batch):
    return {tuple(r) for r in np.concatenate([batch["tokens"], batch["targets"][:, -1:]], axis=1)}


# ---------------------------------------------------------------- windows and masks


def test_packed_windows_cover_every_target_once():
    docs = _docs([5, 9, 3, 10])
    stream = np.concatenate(docs)
    src = WindowSource.from_documents(docs, seq_len=4, pad_id=PAD, packing=True)
    assert len(src) == -(-(len(stream) - 1) // 4)
    batch = batch_from_windows([src[i] for i in range(len(src))], PAD)
    # Window i+1 starts where window i's inputs end: targets are the stream shifted by one.
    np.testing.assert_array_equal(batch["targets"][batch["loss_mask"] > 0], stream[1:])
    np.testing.assert_array_equal(batch["tokens"][batch["loss_mask"] > 0], stream[:-1])
    assert (batch["attention_mask"] == (batch["tokens"] != PAD)).all()
    assert src.num_target_tokens == len(stream) - 1 == batch["loss_mask"].sum()
    # Documents span windows (packing), and only the final window holds pad.
    assert (batch["targets"][:-1] != PAD).all()
    assert batch["loss_mask"][-1].tolist() == [1, 1, 0, 0]


def test_unpacked_windows_keep_documents_apart():
    docs = _docs([5, 9, 2])
    src = WindowSource.from_documents(docs, seq_len=4, pad_id=PAD, packing=False)
    assert len(src) == 1 + 2 + 1  # ceil((n - 1) / 4) per document
    batch = batch_from_windows([src[i] for i in range(len(src))], PAD)
    for row, mask in zip(batch["targets"], batch["loss_mask"]):
        real = row[mask > 0]
        assert (row[mask == 0] == PAD).all()
        # No row mixes documents: EOT, if present, is the last real target.
        assert EOT not in real[:-1]
    np.testing.assert_array_equal(
        batch["targets"][batch["loss_mask"] > 0], np.concatenate([d[1:] for d in docs])
    )
    # Right-padded: attention mask is 1 then 0, and is 0 exactly on pad inputs.
    assert (batch["attention_mask"] == (batch["tokens"] != PAD)).all()
    assert batch["attention_mask"][-1].tolist() == [1, 1, 0, 0]  # x, EOT, pad, pad
    assert batch["loss_mask"][-1].tolist() == [1, 0, 0, 0]  # only x -> EOT counts


def test_batch_format():
    batch = batch_from_windows(np.array([[1, 2, 3, PAD], [4, EOT, PAD, PAD]]), PAD)
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "tokens": ((2, 3), "int32"),
        "targets": ((2, 3), "int32"),
        "loss_mask": ((2, 3), "float32"),
        "attention_mask": ((2, 3), "int32"),
    }
    assert batch["loss_mask"].tolist() == [[1, 1, 0], [1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


# ---------------------------------------------------------------- Grain iterator


@pytest.fixture(scope="module")
def source():
    return WindowSource.from_documents(_docs([40, 33, 17, 71]), seq_len=8, pad_id=PAD, packing=True)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_deterministic_for_a_seed_and_different_across_seeds(source):
    a = _take(iter(train_dataset(source, batch_size=4, seed=3)), 6)
    b = _take(iter(train_dataset(source, batch_size=4, seed=3)), 6)
    c = _take(iter(train_dataset(source, batch_size=4, seed=4)), 6)
    _same(a, b)
    assert any((x["tokens"] != y["tokens"]).any() for x, y in zip(a, c))


def test_each_epoch_is_a_fresh_permutation(source):
    assert len(source) == 20
    batches = _take(iter(train_dataset(source, batch_size=4, seed=0)), 10)
    all_rows = {tuple(source[i]) for i in range(len(source))}
    epochs = [set().union(*map(_rows, batches[:5])), set().union(*map(_rows, batches[5:]))]
    assert epochs[0] == epochs[1] == all_rows
    order = [np.concatenate([b["tokens"] for b in batches[e * 5 : e * 5 + 5]]) for e in (0, 1)]
    assert (order[0] != order[1]).any()  # reseeded each epoch


def test_resume_from_state_gives_identical_batches(source):
    it = iter(train_dataset(source, batch_size=4, seed=1))
    _take(it, 7)  # crosses into the second epoch
    state = json.loads(json.dumps(it.get_state()))  # checkpoints store it as JSON
    expected = _take(it, 9)
    fresh = iter(train_dataset(source, batch_size=4, seed=1))
    fresh.set_state(state)
    _same(_take(fresh, 9), expected)


def test_hosts_split_the_same_global_batch(source):
    single = _take(iter(train_dataset(source, batch_size=4, seed=2)), 8)
    hosts = [
        _take(iter(train_dataset(source, batch_size=4, seed=2, process_index=p, process_count=2)), 8)
        for p in range(2)
    ]
    for step, batch in enumerate(single):
        parts = [h[step] for h in hosts]
        assert all(p["tokens"].shape == (2, 8) for p in parts)
        assert _rows(parts[0]) | _rows(parts[1]) == _rows(batch)
        assert not _rows(parts[0]) & _rows(parts[1])
        # In order, too: the hosts' blocks stacked in process order are the global batch, so
        # per-row randomness (dropout) matches a 1-process run.
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])


def test_batch_size_must_divide_over_processes(source):
    with pytest.raises(ConfigError, match="divisible"):
        train_dataset(source, batch_size=5, seed=0, process_count=2)


def test_eval_batches_cover_all_windows_with_fixed_shapes(source):
    for processes in (1, 2):
        per_host = [list(eval_batches(source, batch_size=8, process_index=p, process_count=processes))
                    for p in range(processes)]
        assert len({len(h) for h in per_host}) == 1 and len(per_host[0]) == 3  # ceil(20 / 8)
        batches = [b for h in per_host for b in h]
        assert {b["tokens"].shape for b in batches} == {(8 // processes, 8)}
        assert sum(b["loss_mask"].sum() for b in batches) == source.num_target_tokens
    assert len(list(eval_batches(source, batch_size=8, max_batches=2))) == 2


# ---------------------------------------------------------------- readers and errors


def test_text_and_jsonl_readers(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\n\nsecond doc\n\n")
    (tmp_path / "b.jsonl").write_text('{"body": "row one"}\n\n{"body": "row two", "x": 1}\n')
    assert sources.read_documents(tmp_path / "a.txt") == ["first doc\n\n\nsecond doc\n\n"]
    assert sources.read_documents(tmp_path / "a.txt", separator="\n\n") == ["first doc", "second doc"]
    assert sources.read_documents(tmp_path / "b.jsonl", text_field="body") == ["row one", "row two"]
    # A directory reads its text and JSONL files in name order; a glob picks files.
    assert sources.read_documents(tmp_path, text_field="body", separator="\n\n") == [
        "first doc", "second doc", "row one", "row two"]
    assert sources.read_documents(str(tmp_path / "*.jsonl"), text_field="body") == ["row one", "row two"]


def test_bad_inputs_name_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        sources.read_documents(missing)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"empty.txt: file is empty"):
        sources.read_documents(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "unterminated\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        sources.read_documents(tmp_path / "bad.jsonl")
    (tmp_path / "field.jsonl").write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(DataError, match=r"field.jsonl:2: no field 'text' \(fields: content\).*text_field"):
        sources.read_documents(tmp_path / "field.jsonl")
    (tmp_path / "list.jsonl").write_text('[1, 2]\n')
    with pytest.raises(DataError, match=r"list.jsonl:1: expected a JSON object"):
        sources.read_documents(tmp_path / "list.jsonl")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8"):
        sources.read_documents(tmp_path / "latin1.txt")


def test_tfds_style_records():
    records = [{"text": b"bytes doc"}, {"text": np.array(b"numpy doc", dtype=object)}, {"text": "str doc"}]
    assert sources.documents_from_records(records, "text", "tfds:x") == ["bytes doc", "numpy doc", "str doc"]
    with pytest.raises(DataError, match=r"tfds:x record 1: no field 'text'"):
        sources.documents_from_records([{"text": "a"}, {"other": "b"}], "text", "tfds:x")


def test_split_documents():
    docs = [f"doc {i}" for i in range(10)]
    assert sources.split_documents(docs, 0.2) == (docs[:8], docs[8:])
    train, val = sources.split_documents(["line a\nline b\nline c\nline d\n"], 0.25)
    assert (train, val) == (["line a\nline b\nline c\n"], ["line d\n"])
    with pytest.raises(DataError, match="one-line"):
        sources.split_documents(["no newline at all"], 0.1)


def test_config_validate(tmp_path):
    with pytest.raises(ConfigError, match=r"data.path: .*missing.txt: no such file"):
        LMDataConfig(path=str(tmp_path / "missing.txt")).validate()
    (tmp_path / "a.txt").write_text("x\ny\n")
    LMDataConfig(path=str(tmp_path / "a.txt")).validate()
    with pytest.raises(ConfigError, match="seq_len"):
        LMDataConfig(path=str(tmp_path / "a.txt"), seq_len=0).validate()
    with pytest.raises(ConfigError, match="val_fraction"):
        LMDataConfig(path=str(tmp_path / "a.txt"), val_fraction=1.0).validate()


def test_relative_paths_resolve_under_data_dir(tmp_path, monkeypatch):
    assert sources.resolve_path("a/b.txt", str(tmp_path)) == tmp_path / "a/b.txt"
    assert sources.resolve_path("/abs.txt", str(tmp_path)).as_posix() == "/abs.txt"
    monkeypatch.setenv("JAXRL_DATA_DIR", str(tmp_path))
    assert sources.resolve_path("c.txt") == tmp_path / "c.txt"


def test_load_prompts(tmp_path, tok):
    (tmp_path / "p.txt").write_text("Tell me a story.\n\n  \nWrite a poem.\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "Q1"}\n{"prompt": "Q2"}\n{"prompt": "Q3"}\n')
    (tmp_path / "corpus.txt").write_text("Alpha beta gamma delta.\n\nOne two three four five.\n")
    assert sources.load_prompts(tmp_path / "p.txt") == ["Tell me a story.", "Write a poem."]
    assert sources.load_prompts(tmp_path / "p.jsonl", limit=2) == ["Q1", "Q2"]
    prefixes = sources.load_prompts(tmp_path / "corpus.txt", prefix_tokens=3, tokenizer=tok)
    assert prefixes == ["Alpha beta gamma", "One two three"]


# ---------------------------------------------------------------- end to end with the tokenizer


def test_chunked_tokenization_matches_whole_documents(tok, shared_data):
    """Long documents are cut for parallel encoding; the ids must not change."""
    rng = np.random.default_rng(0)
    alphabet = ["a", "Zb", " ", "  ", "\n", "\n\n", "'s", "1", ".", "é", "\t", " x"]
    texts = ["".join(rng.choice(alphabet, size=rng.integers(1, 50))) for _ in range(300)]
    texts.append((shared_data / "corpora/tinyshakespeare/input.txt").read_text()[:200_000])
    chunked = lm.tokenize_documents(texts, tok, chunk_chars=1)
    assert len(lm._chunks(texts[-1], 1)) > 1000  # the cut really happens
    for text, ids in zip(texts, chunked):
        assert ids[-1] == EOT and ids[:-1].tolist() == tok.encode(text), repr(text)


def test_jsonl_corpus_end_to_end(tmp_path, tok):
    rows = [{"text": f"Document number {i} says hello."} for i in range(12)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = LMDataConfig(path=str(tmp_path / "c.jsonl"), seq_len=16, batch_size=2, packing=False,
                       val_fraction=0.25)
    cfg.validate()
    data = lm.load_lm_data(cfg, tok, process_index=0, process_count=1)
    assert (len(data.train), len(data.val)) == (9, 3)  # one window per short document
    val = list(data.val_batches())
    assert len(val) == 2 and not val[-1]["loss_mask"][1].any()  # 3 windows + 1 blank row
    val_texts = [tok.decode(row) for b in val for row, m in zip(b["tokens"], b["loss_mask"]) if m.any()]
    assert val_texts == [r["text"] + "<|endoftext|>" for r in rows[9:]]  # in order, EOT-terminated
    batch = next(data.train_iterator())
    assert (batch["targets"][batch["loss_mask"] > 0] == EOT).sum() == 2


def test_tinyshakespeare_split_is_exact(shared_data, tok):
    cfg = LMDataConfig(path="corpora/tinyshakespeare/input.txt", data_dir=str(shared_data),
                       seq_len=128, batch_size=8)
    cfg.validate()
    data = lm.load_lm_data(cfg, tok, process_index=0, process_count=1)
    text = (shared_data / "corpora/tinyshakespeare/input.txt").read_text()
    # Train and validation are the two halves of the file cut at a line, each ending in EOT.
    train_text = tok.decode(data.train.tokens[:-1])
    assert train_text + tok.decode(data.val.tokens[:-1]) == text
    assert 0.89 < len(train_text) / len(text) < 0.91
    assert data.train.tokens[-1] == data.val.tokens[-1] == EOT
    assert data.train.num_target_tokens + data.val.num_target_tokens > 330_000
    batch = next(data.train_iterator())
    assert batch["tokens"].shape == (8, 128) and batch["loss_mask"].all()
