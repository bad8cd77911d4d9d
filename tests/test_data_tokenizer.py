"""SentencePiece wrapper: deterministic training, exact round trips, special ids, parallel encoding."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from conftest import DATA_TINY_VOCAB, english_like_text

from flm.data import Tokenizer, train_tokenizer
from flm.data.tokenizer import EOS_TEXT, parallel_encode


def test_training_is_byte_identical(tmp_path):
    texts = [english_like_text(i) for i in range(6)]
    first = train_tokenizer(texts, tmp_path / "a" / "tok", 350)
    second = train_tokenizer(texts, tmp_path / "b" / "other_name", 350)
    assert first.name == "tok.model" and first.read_bytes() == second.read_bytes()


def test_training_from_files_equals_training_from_text(tmp_path, tiny_text_dir):
    files = sorted(tiny_text_dir.glob("*.txt"))
    from_files = train_tokenizer(files, tmp_path / "files", 350)
    from_text = train_tokenizer([f.read_text() for f in files], tmp_path / "text", 350)
    assert from_files.read_bytes() == from_text.read_bytes()


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_round_trip_and_special_ids(tmp_path, model_type):
    path = train_tokenizer([english_like_text(i) for i in range(8)], tmp_path / model_type, 380, model_type)
    tokenizer = Tokenizer.load(path)
    assert tokenizer.vocab_size == 380 and tokenizer.eos_id == 2
    assert tokenizer.path == path and tokenizer.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    text = "The king speaks.\n\n  Indented line\twith tab,  ünïcödé ☃ 漢字 and digits 1234.\n"
    ids = tokenizer.encode(text)
    assert max(ids) < 380 and tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == text  # byte fallback covers unseen characters
    assert tokenizer.encode_batch([text, "x"]) == [ids, tokenizer.encode("x")]


def test_line_by_line_encoding_matches_sentencepiece(tiny_tokenizer, tiny_text_dir):
    tokenizer = Tokenizer(tiny_tokenizer)
    assert tokenizer._newline_id is not None
    for path in sorted(tiny_text_dir.glob("*.txt")):
        text = path.read_text()
        assert tokenizer.encode(text) == tokenizer._sp.encode(text)


def test_decode_accepts_arrays_and_renders_eos(tiny_tokenizer):
    tokenizer = Tokenizer(tiny_tokenizer)
    first, second = tokenizer.encode("the king"), tokenizer.encode("a queen\n")
    ids = first + [tokenizer.eos_id] + second + [tokenizer.eos_id]
    expected = f"the king{EOS_TEXT}a queen\n{EOS_TEXT}"
    assert tokenizer.decode(ids) == expected
    assert tokenizer.decode(np.array(ids, dtype=np.uint16)) == expected
    assert tokenizer.decode(torch.tensor([ids])) == expected
    assert tokenizer.decode(ids, eos_text="|") == "the king|a queen\n|"


def test_parallel_encode_keeps_order(tiny_tokenizer):
    tokenizer = Tokenizer(tiny_tokenizer)
    texts = [english_like_text(i, sentences=3 + i % 7) for i in range(40)]
    expected = [tokenizer.encode(text) for text in texts]
    for workers in (1, 2):
        encoded = list(parallel_encode(tiny_tokenizer, iter(texts), workers, batch_chars=500))
        assert [e.tolist() for e in encoded] == expected


def test_empty_training_input(tmp_path):
    with pytest.raises(ValueError, match="the input has no text"):
        train_tokenizer(["", "  \n"], tmp_path / "tok", DATA_TINY_VOCAB)
