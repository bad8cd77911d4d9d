"""tools/pretokenize.py: input kinds, splits, determinism, tokenizer reuse and empty input."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest
import zstandard
from conftest import REPO, english_like_text, load_data_tool

from flm.data import TokenDataset, Tokenizer, check_tokenizer
from flm.data.tokenizer import EOS_TEXT


@pytest.fixture(scope="module")
def pretokenize():
    return load_data_tool("pretokenize").pretokenize


def decoded_documents(dataset, split: str) -> list[str]:
    tokens = TokenDataset(dataset, split)
    text = Tokenizer(dataset / "tokenizer.model").decode(tokens.read(0, tokens.num_tokens))
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
