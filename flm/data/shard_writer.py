"""The writer of the compressed token-shard format (``flm.data.shards`` documents it).

``write_dataset`` packs per-document token arrays into frames of ``frame_tokens``
ids, compresses each with zstd (with a dictionary trained on the first frames),
groups them into shard files with a frame index and footer, and writes the
manifest last, all inside an atomic directory: an interrupted write leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from flm.data.shards import (
    _FOOTER,
    _MAGIC,
    _SPLIT_NAME,
    DEFAULT_DICT_BYTES,
    DEFAULT_FRAME_TOKENS,
    DEFAULT_LEVEL,
    DEFAULT_SHARD_TOKENS,
    DICT_SAMPLE_BYTES,
    DICT_SAMPLE_FRAMES,
    DICTIONARY_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    FRAMINGS,
    MANIFEST_FILE,
    TOKENIZER_FILES,
    DataFormatError,
    atomic_directory,
    sha256_file,
    token_dtype,
)


class _ShardFile:
    """One shard being written: frames, then the frame index and the footer."""

    def __init__(self, path: Path, frame_tokens: int, itemsize: int) -> None:
        self.path, self.frame_tokens, self.itemsize = path, frame_tokens, itemsize
        self.file, self.hash = open(path, "wb"), hashlib.sha256()
        self.offsets, self.num_tokens = [0], 0

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.hash.update(data)

    def add_frame(self, compressed: bytes, num_tokens: int) -> None:
        self._write(compressed)
        self.offsets.append(self.offsets[-1] + len(compressed))
        self.num_tokens += num_tokens

    def close(self) -> dict[str, Any]:
        """Write index and footer, fsync, and return the shard's manifest entry."""
        num_frames = len(self.offsets) - 1
        tail = np.asarray(self.offsets, "<u8").tobytes() + _FOOTER.pack(
            _MAGIC, self.num_tokens, num_frames, self.frame_tokens, self.itemsize)
        self._write(tail)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {"file": self.path.name, "num_tokens": self.num_tokens, "num_frames": num_frames,
                "bytes": self.offsets[-1] + len(tail), "sha256": self.hash.hexdigest()}


class _FrameCompressor:
    """zstd for every frame of a dataset, with a dictionary trained on its first frames.

    Until ``DICT_SAMPLE_FRAMES`` frames or ``DICT_SAMPLE_BYTES`` have been seen (or the
    first split ends) frames are held back; then the dictionary is trained on them (``dict_bytes`` bytes; none if
    0, or if zstd cannot train one from so little data) and every frame is compressed
    with it. Training is deterministic, so the dataset stays byte-identical.
    """

    def __init__(self, level: int, dict_bytes: int) -> None:
        self.level, self.dict_bytes = level, dict_bytes
        self.dictionary: bytes | None = None
        self.ready = dict_bytes <= 0
        self.samples: list[bytes] = []
        self.sample_bytes = 0
        self._compressor = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True)

    def train(self) -> None:
        if not self.ready and self.samples:
            try:
                trained = zstandard.train_dictionary(self.dict_bytes, self.samples, level=self.level, threads=0)
            except zstandard.ZstdError:  # too few or too small samples: no dictionary
                trained = None
            if trained is not None:
                self.dictionary = trained.as_bytes()
                self._compressor = zstandard.ZstdCompressor(
                    level=self.level, dict_data=zstandard.ZstdCompressionDict(self.dictionary),
                    write_content_size=True, write_checksum=True, write_dict_id=True)
        self.ready, self.samples, self.sample_bytes = True, [], 0

    def add_sample(self, raw: bytes) -> bool:
        """Keep a frame for training; True once there are enough."""
        self.samples.append(raw)
        self.sample_bytes += len(raw)
        return len(self.samples) >= DICT_SAMPLE_FRAMES or self.sample_bytes >= DICT_SAMPLE_BYTES

    def compress(self, raw: bytes) -> bytes:
        return self._compressor.compress(raw)

    def manifest_entry(self, directory: Path) -> dict[str, Any]:
        """``compression`` of the manifest; writes the dictionary file if there is one."""
        entry: dict[str, Any] = {"codec": "zstd", "level": self.level, "dictionary": None}
        if self.dictionary is not None:
            path = directory / DICTIONARY_FILE
            with open(path, "wb") as f:
                f.write(self.dictionary)
                f.flush()
                os.fsync(f.fileno())
            entry["dictionary"] = {"file": DICTIONARY_FILE, "bytes": len(self.dictionary),
                                   "sha256": hashlib.sha256(self.dictionary).hexdigest()}
        return entry


class _SplitWriter:
    """Packs the documents of one split into a stream of frames and shards."""

    def __init__(self, directory: Path, split: str, vocab_size: int, eos_id: int, bos_id: int | None,
                 frame_tokens: int, shard_tokens: int, compressor: _FrameCompressor) -> None:
        self.directory, self.split = directory, split
        self.vocab_size, self.eos = vocab_size, np.array([eos_id])
        self.bos = None if bos_id is None else np.array([bos_id])
        self.frame_tokens, self.shard_tokens = frame_tokens, shard_tokens
        self.compressor = compressor
        self.pending: list[bytes] = []  # raw frames held back until the dictionary is trained
        self.frame = np.empty(frame_tokens, token_dtype(vocab_size))
        self.fill = 0
        self.shards: list[dict[str, Any]] = []
        self.num_documents = 0
        self._shard: _ShardFile | None = None

    def add_document(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
            raise DataFormatError(f"split '{self.split}' document {self.num_documents}: expected a 1-D "
                                  f"integer array, got shape {tokens.shape} dtype {tokens.dtype}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= self.vocab_size)][0]
            raise DataFormatError(f"split '{self.split}' document {self.num_documents}: token id {bad} "
                                  f"is outside [0, vocab_size={self.vocab_size})")
        if self.bos is not None:
            self._append(self.bos)
        self._append(tokens)
        self._append(self.eos)
        self.num_documents += 1

    def _append(self, tokens: np.ndarray) -> None:
        while tokens.size:
            n = min(tokens.size, self.frame_tokens - self.fill)
            self.frame[self.fill:self.fill + n] = tokens[:n]
            self.fill += n
            tokens = tokens[n:]
            if self.fill == self.frame_tokens:
                self._flush_frame()

    def _flush_frame(self) -> None:
        raw = self.frame[:self.fill].tobytes()
        self.fill = 0
        if self.compressor.ready:
            self._write_frame(raw)
            return
        self.pending.append(raw)
        if self.compressor.add_sample(raw):
            self._release_pending()

    def _release_pending(self) -> None:
        self.compressor.train()
        for raw in self.pending:
            self._write_frame(raw)
        self.pending = []

    def _write_frame(self, raw: bytes) -> None:
        if self._shard is None:
            path = self.directory / f"{self.split}-{len(self.shards):05d}.flm"
            self._shard = _ShardFile(path, self.frame_tokens, self.frame.itemsize)
        num_tokens = len(raw) // self.frame.itemsize
        self._shard.add_frame(self.compressor.compress(raw), num_tokens)
        if self._shard.num_tokens == self.shard_tokens:
            self.shards.append(self._shard.close())
            self._shard = None

    def finish(self) -> dict[str, Any]:
        if self.fill:
            self._flush_frame()
        self._release_pending()  # a first split shorter than the dictionary's sample
        if self._shard is not None:
            self.shards.append(self._shard.close())
        return {"num_tokens": sum(s["num_tokens"] for s in self.shards),
                "num_documents": self.num_documents, "shards": self.shards}


def write_dataset(out_dir: str | os.PathLike, splits: Mapping[str, Iterable[np.ndarray]],
                  tokenizer_path: str | os.PathLike, vocab_size: int, eos_id: int, *,
                  bos_id: int | None = None, pad_id: int | None = None, framing: str = "eos",
                  tokenizer_kind: str = "sentencepiece",
                  frame_tokens: int = DEFAULT_FRAME_TOKENS, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                  level: int = DEFAULT_LEVEL, dict_bytes: int = DEFAULT_DICT_BYTES,
                  overwrite: bool = False) -> dict[str, Any]:
    """Write ``splits`` (name -> iterable of per-document token arrays) as a dataset at ``out_dir``.

    Every array is framed as ``framing`` says: "eos" appends ``eos_id``; "bos_eos"
    and "sentences" (whose arrays are single sentences) also prepend ``bos_id``.
    The tokenizer file is copied in as ``TOKENIZER_FILES[tokenizer_kind]``; ``pad_id``
    is only recorded. Splits are consumed lazily, in order. Frames are compressed
    with a zstd dictionary of ``dict_bytes`` (0: none) trained on the first
    ``DICT_SAMPLE_FRAMES`` frames. The write is atomic (see ``atomic_directory``) and
    deterministic. Returns the manifest.
    """
    if frame_tokens <= 0 or shard_tokens <= 0 or shard_tokens % frame_tokens:
        raise ValueError(f"shard_tokens ({shard_tokens}) must be a positive multiple of "
                         f"frame_tokens ({frame_tokens})")
    if framing not in FRAMINGS:
        raise ValueError(f"framing {framing!r} is not one of {', '.join(FRAMINGS)}")
    if tokenizer_kind not in TOKENIZER_FILES:
        raise ValueError(f"tokenizer_kind {tokenizer_kind!r} is not one of {', '.join(TOKENIZER_FILES)}")
    if framing != "eos" and bos_id is None:
        raise ValueError(f"framing {framing!r} puts a BOS before every sequence, but bos_id is None")
    for name, token in (("eos_id", eos_id), ("bos_id", bos_id), ("pad_id", pad_id)):
        if token is not None and not 0 <= token < vocab_size:
            raise ValueError(f"{name} {token} is outside [0, vocab_size={vocab_size})")
    tokenizer_file = TOKENIZER_FILES[tokenizer_kind]
    with atomic_directory(out_dir, overwrite) as tmp:
        shutil.copyfile(tokenizer_path, tmp / tokenizer_file)
        infos, compressor = {}, _FrameCompressor(level, dict_bytes)
        for split, documents in splits.items():
            if not _SPLIT_NAME.match(split):
                raise ValueError(f"split name {split!r} must match {_SPLIT_NAME.pattern}")
            writer = _SplitWriter(tmp, split, vocab_size, eos_id, None if framing == "eos" else bos_id,
                                  frame_tokens, shard_tokens, compressor)
            for document in documents:
                writer.add_document(document)
            infos[split] = writer.finish()
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "tokenizer": {"file": tokenizer_file, "sha256": sha256_file(tmp / tokenizer_file),
                          "kind": tokenizer_kind},
            "vocab_size": vocab_size, "eos_id": eos_id, "bos_id": bos_id, "pad_id": pad_id,
            "framing": framing, "dtype": token_dtype(vocab_size).name,
            "frame_tokens": frame_tokens, "shard_tokens": shard_tokens,
            "compression": compressor.manifest_entry(tmp), "splits": infos,
        }
        with open(tmp / MANIFEST_FILE, "w") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return manifest
