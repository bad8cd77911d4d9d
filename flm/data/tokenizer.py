"""SentencePiece tokenizer: deterministic training and a small encode/decode wrapper.

Special ids: unk=0, bos=1, eos=2, no pad (-1). Only EOS is used by flm: it ends
every document in the token stream. The text is not normalised (identity rule,
no dummy prefix, no whitespace collapsing) and "\\n" is a piece of its own, so
``decode(encode(text)) == text`` for any text; characters outside the vocabulary
fall back to byte pieces. ``decode`` renders EOS as ``EOS_TEXT``.

Training is deterministic: the input sample is chosen by a seeded reservoir and
sentencepiece runs single-threaded, so the same input and arguments give a
byte-identical ``.model`` file.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import sentencepiece as spm

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
EOS_TEXT = "<eos>"
DEFAULT_SAMPLE_BYTES = 20_000_000
_CHUNK_BYTES = 2048  # training "sentences": newline-aligned chunks of about this size


def _chunks(text: str) -> Iterator[str]:
    """Split ``text`` at newlines into pieces of about ``_CHUNK_BYTES`` (lines are never split)."""
    start = 0
    while start < len(text):
        cut = text.find("\n", start + _CHUNK_BYTES)
        end = len(text) if cut < 0 else cut + 1
        yield text[start:end]
        start = end


def _read_texts(texts_or_files: Iterable[str | os.PathLike]) -> Iterator[str]:
    for item in texts_or_files:
        yield Path(item).read_text(encoding="utf-8") if isinstance(item, os.PathLike) else item


def _sample(texts: Iterable[str], sample_bytes: int, seed: int) -> list[str]:
    """Uniform, seeded reservoir sample of about ``sample_bytes`` of text chunks, in input order."""
    capacity = max(1, sample_bytes // _CHUNK_BYTES)
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    seen = 0
    for text in texts:
        for chunk in _chunks(text):
            if len(reservoir) < capacity:
                reservoir.append((seen, chunk))
            else:
                slot = rng.randrange(seen + 1)
                if slot < capacity:
                    reservoir[slot] = (seen, chunk)
            seen += 1
    return [chunk for _, chunk in sorted(reservoir)]


def train_tokenizer(texts_or_files: Iterable[str | os.PathLike], model_prefix: str | os.PathLike,
                    vocab_size: int, model_type: Literal["bpe", "unigram"] = "bpe",
                    byte_fallback: bool = True, sample_bytes: int = DEFAULT_SAMPLE_BYTES,
                    seed: int = 0) -> Path:
    """Train a sentencepiece model and write it to ``<model_prefix>.model``; return that path.

    ``texts_or_files`` yields documents: ``str`` items are text, ``os.PathLike``
    items are UTF-8 files. Training uses a seeded sample of about ``sample_bytes``.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    sample = _sample(_read_texts(texts_or_files), sample_bytes, seed)
    if not any(chunk.strip() for chunk in sample):
        raise ValueError("cannot train a tokenizer: the input has no text")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=byte_fallback, unk_id=UNK_ID, bos_id=BOS_ID,
        eos_id=EOS_ID, pad_id=-1, user_defined_symbols=["\n"], normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        split_digits=True, character_coverage=0.9995, max_sentence_length=4 * _CHUNK_BYTES,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2)
    path = Path(f"{model_prefix}.model")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, path)
    return path


class Tokenizer:
    """A trained sentencepiece model: ``encode`` text to ids and ``decode`` ids to text."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        proto = self.path.read_bytes()
        self.sha256 = hashlib.sha256(proto).hexdigest()
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        self._newline_id = _user_defined_id(proto, "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        return cls(path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOS appended)."""
        if self._newline_id is None:
            return self._sp.encode(text)
        # No piece spans a user-defined "\n", so encoding line by line gives the same ids, 2x faster.
        ids: list[int] = []
        for i, line in enumerate(self._sp.encode(text.split("\n"), num_threads=1)):
            if i:
                ids.append(self._newline_id)
            ids.extend(line)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Any, eos_text: str = EOS_TEXT) -> str:
        """Text of ``ids`` (list, numpy array or tensor, any shape flattened); EOS becomes ``eos_text``."""
        if hasattr(ids, "detach"):  # torch.Tensor, without importing torch here
            ids = ids.detach().cpu().numpy()
        flat = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
        documents, start = [], 0
        for i, token in enumerate(flat + [self.eos_id]):
            if token == self.eos_id:
                documents.append(self._sp.decode(flat[start:i]))
                start = i + 1
        return eos_text.join(documents)


def _user_defined_id(model_proto: bytes, piece: str) -> int | None:
    """Id of ``piece`` if the model defines it as a user-defined symbol (None if unknown)."""
    try:
        from sentencepiece import sentencepiece_model_pb2  # needs protobuf, which is optional
    except ImportError:
        return None
    model = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
    for i, entry in enumerate(model.pieces):
        if entry.piece == piece and entry.type == entry.USER_DEFINED:
            return i
    return None


_worker_tokenizer: Tokenizer | None = None


def _init_worker(path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(path)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(_worker_tokenizer.encode(text), dtype=np.int32) for text in texts]


def _batches(texts: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def parallel_encode(tokenizer_path: str | os.PathLike, texts: Iterable[str], workers: int,
                    batch_chars: int = 1 << 18) -> Iterator[np.ndarray]:
    """Encode ``texts`` in ``workers`` processes (batches of ~``batch_chars``); yield int32 arrays in order."""
    batches = _batches(texts, batch_chars)
    if workers <= 1:
        _init_worker(str(tokenizer_path))
        for encoded in map(_encode_in_worker, batches):
            yield from encoded
        return
    with multiprocessing.Pool(workers, _init_worker, (str(tokenizer_path),)) as pool:
        for encoded in pool.imap(_encode_in_worker, batches):
            yield from encoded
