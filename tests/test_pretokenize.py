"""tools/pretokenize.py: input kinds, splits, determinism, tokenizer kinds, framing and bad input."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest
import zstandard
from conftest import REPO, english_like_text, load_data_tool

from flm.data import TokenDataset, Tokenizer, check_tokenizer, load_manifest
from flm.data.tokenizer import EOS_TEXT


@pytest.fixture(scope="module")
def pretokenize():
    return load_data_tool("pretokenize").pretokenize


def decoded_documents(dataset, split: str, tokenizer_file: str = "tokenizer.model") -> list[str]:
    tokens = TokenDataset(dataset, split)
    text = Tokenizer(dataset / tokenizer_file).decode(tokens.read(0, tokens.num_tokens))
    assert text.endswith(EOS_TEXT)
    return text[:-len(EOS_TEXT)].split(EOS_TEXT)


def test_mixed_inputs_keep_document_order(tmp_path, tiny_text_dir, pretokenize):
    texts = [english_like_text(50 + i, sentences=6) for i in range(9)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[:3]))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"body": t}) + "\n" for t in texts[3:6])
    with zstandard.open(tmp_path / "c.jsonl.zst", "wt") as f:
        f.writelines(json.dumps({"body": t}) + "\n" for t in texts[6:])
    (tiny_text_dir / "sub").mkdir()
    (tiny_text_dir / "sub" / "z.txt").write_text("  \n")  # whitespace-only: skipped
    out = tmp_path / "tokens"
    summary = pretokenize(inputs=f"{tmp_path}/*.jsonl*", val_inputs=str(tiny_text_dir), out=str(out),
                          vocab_size=400, text_field="body", workers=2)
    assert decoded_documents(out, "train") == texts
    validation = [p.read_text() for p in sorted(tiny_text_dir.glob("*.txt"))]
    assert decoded_documents(out, "validation") == validation
    assert summary["documents"] == {"train": 9, "validation": 12}
    assert summary["compression_ratio"] > 1
    TokenDataset(out, "train").verify()


def test_validation_fraction_and_determinism(tmp_path, tiny_text_dir, pretokenize):
    for name in ("a", "b"):
        pretokenize(inputs=[str(p) for p in sorted(tiny_text_dir.glob("*.txt"))], out=str(tmp_path / name),
                    vocab_size=400, val_fraction=0.25, workers=1)
    documents = [p.read_text() for p in sorted(tiny_text_dir.glob("*.txt"))]
    assert decoded_documents(tmp_path / "a", "validation") == documents[::4]
    assert decoded_documents(tmp_path / "a", "train") == [d for i, d in enumerate(documents) if i % 4]
    for path in sorted((tmp_path / "a").iterdir()):
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name


def test_existing_tokenizer_is_reused(tmp_path, tiny_text_dir, tiny_tokenizer, pretokenize):
    out = tmp_path / "tokens"
    pretokenize(inputs=str(tiny_text_dir), out=str(out), tokenizer=str(tiny_tokenizer), workers=1)
    check_tokenizer(out, tiny_tokenizer)
    with pytest.raises(ValueError, match="--vocab_size 512 disagrees with --tokenizer"):
        pretokenize(inputs=str(tiny_text_dir), out=str(tmp_path / "x"), tokenizer=str(tiny_tokenizer),
                    vocab_size=512)


def test_no_matching_inputs(tmp_path, pretokenize):
    with pytest.raises(ValueError, match=r"no input files matched --inputs '.*nothing/\*\.txt'"):
        pretokenize(inputs=str(tmp_path / "nothing" / "*.txt"), out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_all_documents_empty(tmp_path, tiny_tokenizer, pretokenize):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(" \n\n ")
    with pytest.raises(ValueError, match=r"all documents in --inputs .* are empty"):
        pretokenize(inputs=str(tmp_path), out=str(tmp_path / "out"), vocab_size=400)
    with pytest.raises(ValueError, match=r"split 'train' is empty: all documents from --inputs"):
        pretokenize(inputs=str(tmp_path), out=str(tmp_path / "out"), tokenizer=str(tiny_tokenizer))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool", ["pretokenize", "fetch_corpus"])
def test_cli_help(tool):
    result = subprocess.run([sys.executable, f"tools/{tool}.py", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "FLAGS" in result.stdout + result.stderr  # fire prints help to stderr


# --------------------------------------------------------------------------- tokenizer kinds and framing

FRAMING_DOCS = ["The king speaks.\nThe queen speaks,\n\n  \nthe king.", "Queen\n"]


@pytest.fixture
def framing_inputs(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in FRAMING_DOCS))
    return str(tmp_path / "in")


def stream(dataset, split: str = "train") -> list[int]:
    tokens = TokenDataset(dataset, split)
    return tokens.read(0, tokens.num_tokens).tolist()


@pytest.mark.parametrize("framing", ["eos", "bos_eos", "sentences"])
def test_framing_with_sentencepiece(tmp_path, tiny_tokenizer, framing_inputs, pretokenize, framing):
    out = tmp_path / framing
    summary = pretokenize(inputs=framing_inputs, val_inputs=framing_inputs, out=str(out),
                          tokenizer=str(tiny_tokenizer), framing=framing, workers=1)
    tok = Tokenizer(tiny_tokenizer)
    bos, eos = tok.bos_id, tok.eos_id
    assert (bos, eos) == (1, 2)
    if framing == "eos":
        expected = [t for doc in FRAMING_DOCS for t in tok.encode(doc) + [eos]]
    elif framing == "bos_eos":
        expected = [t for doc in FRAMING_DOCS for t in [bos] + tok.encode(doc) + [eos]]
    else:  # the blank lines go; the others lose their newline
        lines = ["The king speaks.", "The queen speaks,", "the king.", "Queen"]
        expected = [t for line in lines for t in [bos] + tok.encode(line) + [eos]]
    assert stream(out) == expected
    manifest = load_manifest(out)
    assert (manifest["framing"], manifest["bos_id"], manifest["eos_id"], manifest["pad_id"]) == (framing, 1, 2, None)
    assert manifest["tokenizer"]["kind"] == "sentencepiece" and manifest["tokenizer"]["file"] == "tokenizer.model"
    assert summary["documents"]["train"] == 2
    assert manifest["splits"]["train"]["num_documents"] == (4 if framing == "sentences" else 2)


def test_sentences_with_a_bert_like_tokenizer_json(tmp_path, bert_like_tokenizer, framing_inputs, pretokenize):
    out = tmp_path / "tokens"
    summary = pretokenize(inputs=framing_inputs, val_inputs=framing_inputs, out=str(out),
                          tokenizer=str(bert_like_tokenizer), framing="sentences", workers=2)
    cls, sep = 2, 3  # conftest.BERT_LIKE_VOCAB: the [CLS] the king speak ##s . [SEP] ...
    assert stream(out) == [cls, 5, 6, 8, 9, 10, sep, cls, 5, 7, 8, 9, 11, sep, cls, 5, 6, 10, sep, cls, 7, sep]
    manifest = load_manifest(out)
    assert manifest["tokenizer"] == {"file": "tokenizer.json", "kind": "huggingface",
                                     "sha256": Tokenizer(bert_like_tokenizer).sha256}
    assert (manifest["vocab_size"], manifest["bos_id"], manifest["eos_id"], manifest["pad_id"]) == (12, 2, 3, 0)
    assert summary["sentences"] == {"train": 4, "validation": 4}
    tokenizer = Tokenizer.load(out)  # the dataset directory
    assert tokenizer.path == out / "tokenizer.json"
    assert tokenizer.decode(stream(out)).split(EOS_TEXT)[:2] == ["the king speaks.", "the queen speaks,"]
    with pytest.raises(FileNotFoundError, match=r"stores its tokenizer as tokenizer\.json: load it with "
                                                r"Tokenizer\.load\(.*tokens'\) \(the dataset directory\)"):
        Tokenizer.load(out / "tokenizer.model")
    TokenDataset(out, "validation").verify()


def test_gpt2_dataset(tmp_path, tiny_text_dir, pretokenize):
    out = tmp_path / "tokens"
    pretokenize(inputs=str(tiny_text_dir), out=str(out), tokenizer="gpt2", val_fraction=0.25, workers=2)
    manifest = load_manifest(out)
    assert manifest["tokenizer"]["kind"] == "gpt2" and manifest["tokenizer"]["file"] == "tokenizer.json"
    assert (manifest["vocab_size"], manifest["eos_id"], manifest["bos_id"], manifest["pad_id"]) == (
        50258, 50256, 50256, 50257)
    assert manifest["framing"] == "eos" and manifest["dtype"] == "uint16"
    tokenizer = Tokenizer.load(out)
    documents = [p.read_text() for i, p in enumerate(sorted(tiny_text_dir.glob("*.txt"))) if i % 4]
    assert stream(out) == [t for doc in documents for t in tokenizer.encode(doc) + [50256]]
    assert decoded_documents(out, "train", "tokenizer.json") == documents
    TokenDataset(out, "train").verify()
    with pytest.raises(ValueError, match=r"--vocab_size 50257 disagrees with --tokenizer gpt2 \(vocab size 50258\)"):
        pretokenize(inputs=str(tiny_text_dir), out=str(tmp_path / "x"), tokenizer="gpt2", vocab_size=50257)


def test_bad_tokenizer_and_framing_options(tmp_path, tiny_text_dir, pretokenize):
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"--framing 'lines': expected one of eos, bos_eos, sentences"):
        pretokenize(inputs=str(tiny_text_dir), out=out, framing="lines")
    with pytest.raises(ValueError, match=r"--tokenizer 'gpt3': no such file \(expected 'gpt2', a Hugging Face"):
        pretokenize(inputs=str(tiny_text_dir), out=out, tokenizer="gpt3")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    no_bos = HFTokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>"))
    no_bos.pre_tokenizer = pre_tokenizers.Whitespace()
    no_bos.save(str(tmp_path / "no_bos.json"))
    with pytest.raises(ValueError, match=r"--framing bos_eos starts every sequence with BOS, but --tokenizer "
                                         r".*no_bos\.json has no BOS token"):
        pretokenize(inputs=str(tiny_text_dir), out=out, tokenizer=str(tmp_path / "no_bos.json"), framing="bos_eos")
    assert not (tmp_path / "out").exists()
