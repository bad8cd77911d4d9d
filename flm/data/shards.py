"""Compressed token shards: the on-disk dataset format and its reader (the writer is
``flm.data.shard_writer``).

The format is specified in ``FORMAT.md`` next to this file. In short: a dataset
directory holds ``manifest.json`` (written last), the tokenizer file
(``tokenizer.model`` or ``tokenizer.json``) and, per split, shard files
``<split>-<NNNNN>.flm``. A split is one stream of token ids (each document
framed as the manifest's ``framing`` says, by default followed by EOS) cut into
shards of ``shard_tokens`` tokens; a shard is a sequence of independent zstd
frames of ``frame_tokens`` tokens (compressed with a dictionary trained on the
dataset's first frames, ``zstd.dict``), then a uint64 frame-offset index, then a
32-byte footer. ``write_dataset`` (``flm.data.shard_writer``) writes a dataset
atomically and deterministically; ``TokenDataset`` reads any token range
of a split, decompressing only the frames it touches. Every integrity failure
raises ``DataFormatError`` naming the file and the field or frame.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import mmap
import os
import re
import shutil
import struct
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

FORMAT_NAME = "flm-tokens"
FORMAT_VERSION = 2  # 2: frames may use a zstd dictionary (compression.dictionary)
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"  # the file name of the default kind, sentencepiece
# Tokenizer kinds and the name of their file in a dataset: "gpt2" is GPT-2's BPE stored as a
# Hugging Face tokenizer.json (flm.data.tokenizer.build_gpt2_tokenizer).
TOKENIZER_FILES = {"sentencepiece": TOKENIZER_FILE, "huggingface": "tokenizer.json", "gpt2": "tokenizer.json"}
# How documents become the token stream: "eos": doc EOS; "bos_eos": BOS doc EOS;
# "sentences": BOS sentence EOS for every line of a document (pretokenize splits the lines).
FRAMINGS = ("eos", "bos_eos", "sentences")
DEFAULT_FRAME_TOKENS = 1024
DEFAULT_SHARD_TOKENS = 1 << 26
# zstd level -1 (literals not entropy-coded): random 1024-token windows read at 0.51-0.54x an
# uncompressed memmap, at compression 1.36x; level 3 compresses 1.78x but reads at 0.40-0.42x
# (tools/bench.py reader). Reading is the default's priority; `pretokenize --level 3` trades back.
DEFAULT_LEVEL = -1
DEFAULT_CACHE_BYTES = 32 << 20
DICTIONARY_FILE = "zstd.dict"
DEFAULT_DICT_BYTES = 32 << 10  # 0: no dictionary
DICT_SAMPLE_FRAMES = 1024  # the dictionary is trained on the first frames written (1M tokens by default)
DICT_SAMPLE_BYTES = 8 << 20  # ... or on fewer, if they hold more bytes than this

_FOOTER = struct.Struct("<8sQQII")
_MAGIC = b"FLMTOKS1"
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class DataFormatError(ValueError):
    """A dataset on disk, or its use with a config, is invalid; the message says where and why."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian storage dtype for ids below ``vocab_size``."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (created, renamed files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a sibling temp dir ``<out_dir>.tmp-<pid>`` that replaces ``out_dir`` on success.

    On any exception the temp dir is removed, so an interrupted writer never leaves
    anything at ``out_dir``. An existing non-empty ``out_dir`` is an error unless
    ``overwrite``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_dir(tmp)
        old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- manifest


def _field(obj: Any, key: str, kind: type, where: str, path: Path) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DataFormatError(f"{path}: missing field '{where}{key}' (expected {kind.__name__})")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataFormatError(f"{path}: field '{where}{key}' is {value!r}, expected {kind.__name__}")
    return value


def _optional(obj: dict[str, Any], key: str, default: Any, path: Path, where: str = "",
              choices: Iterable[str] | None = None) -> Any:
    """Fill in a field that datasets written before it existed lack; check it against ``choices``."""
    value = obj.setdefault(key, default)
    if choices is not None and value not in choices:
        raise DataFormatError(f"{path}: field '{where}{key}' is {value!r}, expected one of "
                              f"{', '.join(map(repr, choices))}")
    return value


def load_manifest(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``<dataset_dir>/manifest.json``; raise DataFormatError if invalid.

    Fields added after format_version 1 was first written (tokenizer.kind, bos_id,
    pad_id, framing) are filled in with what older datasets did: a sentencepiece
    tokenizer, no BOS or padding id recorded, EOS framing.
    """
    path = Path(dataset_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DataFormatError(f"{path}: manifest not found; {dataset_dir} is not a complete flm dataset "
                              "(create one with tools/pretokenize.py)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: not valid JSON ({e})") from None
    if _field(manifest, "format", str, "", path) != FORMAT_NAME:
        raise DataFormatError(f"{path}: field 'format' is {manifest['format']!r}, expected {FORMAT_NAME!r}")
    version = _field(manifest, "format_version", int, "", path)
    if version not in READABLE_VERSIONS:
        raise DataFormatError(f"{path}: unsupported format_version {version}; expected "
                              f"{' or '.join(map(str, READABLE_VERSIONS))} "
                              f"(re-create the dataset with this version's tools/pretokenize.py)")
    tokenizer_file = _field(_field(manifest, "tokenizer", dict, "", path), "file", str, "tokenizer.", path)
    if Path(tokenizer_file).name != tokenizer_file or tokenizer_file in ("", ".", ".."):
        raise DataFormatError(f"{path}: field 'tokenizer.file' must be a plain file name, got {tokenizer_file!r}")
    _field(manifest["tokenizer"], "sha256", str, "tokenizer.", path)
    _optional(manifest["tokenizer"], "kind", "sentencepiece", path, "tokenizer.", TOKENIZER_FILES)
    vocab_size = _field(manifest, "vocab_size", int, "", path)
    if not 0 <= _field(manifest, "eos_id", int, "", path) < vocab_size:
        raise DataFormatError(f"{path}: field 'eos_id' is outside [0, vocab_size={vocab_size})")
    for name in ("bos_id", "pad_id"):
        token = _optional(manifest, name, None, path)
        if token is not None and not (isinstance(token, int) and not isinstance(token, bool)
                                      and 0 <= token < vocab_size):
            raise DataFormatError(f"{path}: field '{name}' is {token!r}, expected null or an id in "
                                  f"[0, vocab_size={vocab_size})")
    if _optional(manifest, "framing", "eos", path, "", FRAMINGS) != "eos" and manifest["bos_id"] is None:
        raise DataFormatError(f"{path}: field 'framing' is {manifest['framing']!r} but 'bos_id' is null")
    if _field(manifest, "dtype", str, "", path) != token_dtype(vocab_size).name:
        raise DataFormatError(f"{path}: field 'dtype' is {manifest['dtype']!r}, expected "
                              f"{token_dtype(vocab_size).name!r} for vocab_size {vocab_size}")
    if version >= 2:  # version 1 has no dictionary, and "compression" is informational there
        compression = _field(manifest, "compression", dict, "", path)
        if compression.get("codec") != "zstd":
            raise DataFormatError(f"{path}: field 'compression.codec' is {compression.get('codec')!r}, "
                                  "expected 'zstd'")
        dictionary = compression.get("dictionary")
        if dictionary is not None:
            _field(compression, "dictionary", dict, "compression.", path)
            file = _field(dictionary, "file", str, "compression.dictionary.", path)
            if Path(file).name != file or file in ("", ".", ".."):
                raise DataFormatError(f"{path}: field 'compression.dictionary.file' must be a plain file name, "
                                      f"got {file!r}")
            _field(dictionary, "bytes", int, "compression.dictionary.", path)
            _field(dictionary, "sha256", str, "compression.dictionary.", path)
    frame_tokens = _field(manifest, "frame_tokens", int, "", path)
    if frame_tokens <= 0:
        raise DataFormatError(f"{path}: field 'frame_tokens' must be positive")
    for name, split in _field(manifest, "splits", dict, "", path).items():
        where = f"splits.{name}."
        total = _field(split, "num_tokens", int, where, path)
        _field(split, "num_documents", int, where, path)
        shards = _field(split, "shards", list, where, path)
        for i, shard in enumerate(shards):
            at = f"{where}shards[{i}]."
            file = _field(shard, "file", str, at, path)
            if Path(file).name != file or file in ("", ".", ".."):
                raise DataFormatError(f"{path}: field '{at}file' must be a plain file name, got {file!r}")
            tokens = _field(shard, "num_tokens", int, at, path)
            if _field(shard, "num_frames", int, at, path) != -(-tokens // frame_tokens) or tokens <= 0:
                raise DataFormatError(f"{path}: field '{at}num_frames' is inconsistent with "
                                      f"num_tokens {tokens} and frame_tokens {frame_tokens}")
            _field(shard, "bytes", int, at, path)
            _field(shard, "sha256", str, at, path)
        if total != sum(s["num_tokens"] for s in shards):
            raise DataFormatError(f"{path}: field '{where}num_tokens' ({total}) is not the sum of its shards")
    return manifest


# --------------------------------------------------------------------------- reader


class _Shard:
    """One memory-mapped shard file; checks size, footer and frame index at open."""

    def __init__(self, path: Path, info: dict[str, Any], frame_tokens: int, dtype: np.dtype) -> None:
        self.path, self.frame_tokens, self.dtype = path, frame_tokens, dtype
        self.num_tokens, self.num_frames = info["num_tokens"], info["num_frames"]
        if not path.is_file():
            raise DataFormatError(f"{path}: shard file listed in the manifest is missing")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise DataFormatError(f"{path}: file is {size} bytes but the manifest records {info['bytes']} "
                                  "(truncated or modified shard)")
        index_start = size - _FOOTER.size - 8 * (self.num_frames + 1)
        if index_start < 0:
            raise DataFormatError(f"{path}: file too small ({size} bytes) for {self.num_frames} frames")
        with open(path, "rb") as f:  # a memoryview slice is much cheaper than an np.memmap slice per frame
            self.data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        magic, tokens, frames, frame_tokens_, itemsize = _FOOTER.unpack(self.data[-_FOOTER.size:])
        expected = (_MAGIC, self.num_tokens, self.num_frames, frame_tokens, dtype.itemsize)
        if (magic, tokens, frames, frame_tokens_, itemsize) != expected:
            raise DataFormatError(f"{path}: footer (magic, num_tokens, num_frames, frame_tokens, itemsize) = "
                                  f"{(magic, tokens, frames, frame_tokens_, itemsize)}, expected {expected}")
        offsets = np.frombuffer(self.data[index_start:size - _FOOTER.size], "<u8")
        if offsets[0] != 0 or offsets[-1] != index_start or np.any(np.diff(offsets.astype(np.int64)) <= 0):
            raise DataFormatError(f"{path}: frame index is inconsistent (offsets must rise from 0 to {index_start})")
        self.offsets = offsets.tolist()

    def frame(self, i: int, dctx: zstandard.ZstdDecompressor) -> np.ndarray:
        """Decompress frame ``i`` into a read-only token array."""
        nbytes = (self.frame_tokens if i < self.num_frames - 1
                  else self.num_tokens - i * self.frame_tokens) * self.dtype.itemsize
        compressed = self.data[self.offsets[i]:self.offsets[i + 1]]
        try:
            declared = zstandard.frame_content_size(compressed)
            if declared != nbytes:
                raise DataFormatError(f"{self.path}: frame {i}: header declares {declared} bytes, expected {nbytes}")
            raw = dctx.decompress(compressed)
        except zstandard.ZstdError as e:
            raise DataFormatError(f"{self.path}: frame {i}: corrupt zstd frame, or not of this dataset's "
                                  f"dictionary ({e})") from None
        if len(raw) != nbytes:
            raise DataFormatError(f"{self.path}: frame {i}: decompressed to {len(raw)} bytes, expected {nbytes}")
        return np.frombuffer(raw, self.dtype)


class TokenDataset:
    """Random access to the token stream of one split of a dataset directory.

    Shards are memory-mapped; only the frames a read touches are decompressed, and
    the most recent ones are kept in a per-process LRU cache of ``cache_bytes``
    (``cache_hits`` / ``cache_misses`` count frame lookups).
    Forked DataLoader workers inherit read-only maps and a private copy of the
    cache; pickling (spawn) drops both and re-opens the shards in the new process.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train",
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.path, self.split = Path(path), split
        self.manifest = load_manifest(self.path)
        if split not in self.manifest["splits"]:
            raise DataFormatError(f"{self.path / MANIFEST_FILE}: no split '{split}' "
                                  f"(available: {sorted(self.manifest['splits'])})")
        info = self.manifest["splits"][split]
        self.vocab_size: int = self.manifest["vocab_size"]
        self.eos_id: int = self.manifest["eos_id"]
        self.bos_id: int | None = self.manifest["bos_id"]
        self.pad_id: int | None = self.manifest["pad_id"]
        self.framing: str = self.manifest["framing"]
        self.tokenizer_kind: str = self.manifest["tokenizer"]["kind"]
        self.dtype = token_dtype(self.vocab_size)
        self.frame_tokens: int = self.manifest["frame_tokens"]
        self.num_tokens: int = info["num_tokens"]
        self.num_documents: int = info["num_documents"]
        self._shard_infos = info["shards"]
        self._starts = np.cumsum([0] + [s["num_tokens"] for s in self._shard_infos]).tolist()
        # every shard but the last holds shard_tokens (as written): the shard of a token is a division
        shard_tokens = self.manifest.get("shard_tokens")
        self._shard_tokens = shard_tokens if isinstance(shard_tokens, int) and shard_tokens > 0 and all(
            s["num_tokens"] == shard_tokens for s in self._shard_infos[:-1]) else 0
        self._cache_frames = max(0, cache_bytes // (self.frame_tokens * self.dtype.itemsize))  # 0: no cache
        self._open()

    def _open(self) -> None:
        self._shards = [_Shard(self.path / s["file"], s, self.frame_tokens, self.dtype) for s in self._shard_infos]
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()  # key: shard << 32 | frame
        dictionary = self._dictionary()
        self._dctx = zstandard.ZstdDecompressor(
            dict_data=None if dictionary is None else zstandard.ZstdCompressionDict(dictionary))
        self.cache_hits = self.cache_misses = 0

    def _dictionary(self) -> bytes | None:
        """The zstd dictionary the frames were compressed with (format_version 2), checked against
        the manifest's size and sha256; None if there is none."""
        info = self.manifest.get("compression", {}).get("dictionary") if self.manifest["format_version"] >= 2 else None
        if info is None:
            return None
        path = self.path / info["file"]
        if not path.is_file():
            raise DataFormatError(f"{path}: zstd dictionary listed in the manifest is missing")
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != info["bytes"] or digest != info["sha256"]:
            raise DataFormatError(f"{path}: zstd dictionary of {len(data)} bytes, sha256 {digest}, does not match "
                                  f"the manifest's {info['bytes']} bytes, sha256 {info['sha256']} "
                                  "(corrupt or modified dictionary)")
        return data

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_shards", "_cache", "_dctx")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def _frame(self, shard: int, frame: int) -> np.ndarray:
        """The tokens of one frame, from the LRU cache or decompressed (this is the reader's
        hot path: one window costs one call, so it stays flat)."""
        key = shard << 32 | frame
        cache = self._cache
        tokens = cache.get(key)
        if tokens is not None:
            self.cache_hits += 1
            cache.move_to_end(key)
            return tokens
        self.cache_misses += 1
        tokens = self._shards[shard].frame(frame, self._dctx)
        if self._cache_frames:
            cache[key] = tokens
            if len(cache) > self._cache_frames:
                cache.popitem(last=False)
        return tokens

    def read(self, start: int, length: int, dtype: np.dtype | None = None) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the split (as ``dtype``, default the stored one)."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"read [{start}, {start + length}) is outside split '{self.split}' "
                             f"of {self.num_tokens} tokens")
        if self._shard_tokens:
            shard, position = divmod(start, self._shard_tokens)
        else:
            shard = bisect.bisect_right(self._starts, start) - 1
            position = start - self._starts[shard]
        frame, offset = divmod(position, self.frame_tokens)
        stop = offset + length
        if stop <= self.frame_tokens:  # fast path: inside one frame (aligned windows)
            tokens = self._frame(shard, frame)
            if stop <= tokens.size:
                return tokens[offset:stop].astype(dtype or self.dtype)
        out = np.empty(length, dtype or self.dtype)
        done = 0
        while done < length:
            pos = start + done
            shard = bisect.bisect_right(self._starts, pos) - 1
            frame, offset = divmod(pos - self._starts[shard], self.frame_tokens)
            tokens = self._frame(shard, frame)
            n = min(length - done, tokens.size - offset)
            out[done:done + n] = tokens[offset:offset + n]
            done += n
        return out

    def verify(self) -> None:
        """Full integrity check of this split: tokenizer and shard checksums, every frame, every id."""
        check_tokenizer(self.path, self.path / self.manifest["tokenizer"]["file"])
        for shard, info in zip(self._shards, self._shard_infos):
            digest = sha256_file(shard.path)
            if digest != info["sha256"]:
                raise DataFormatError(f"{shard.path}: sha256 {digest} does not match the manifest's "
                                      f"{info['sha256']} (corrupt or modified shard)")
            for i in range(shard.num_frames):
                tokens = shard.frame(i, self._dctx)
                if tokens.size and tokens.max() >= self.vocab_size:
                    at = int(np.argmax(tokens >= self.vocab_size))
                    raise DataFormatError(f"{shard.path}: frame {i}: token id {tokens[at]} at shard position "
                                          f"{i * self.frame_tokens + at} is >= vocab_size {self.vocab_size}")


def tokenizer_path(dataset_dir: str | os.PathLike) -> Path:
    """The tokenizer file of a dataset (``tokenizer.model`` or ``tokenizer.json``, as its manifest says)."""
    return Path(dataset_dir) / load_manifest(dataset_dir)["tokenizer"]["file"]


def check_tokenizer(dataset_dir: str | os.PathLike, tokenizer_path: str | os.PathLike) -> None:
    """Raise DataFormatError unless ``tokenizer_path`` is the tokenizer the dataset was made with."""
    manifest = load_manifest(dataset_dir)
    recorded, actual = manifest["tokenizer"]["sha256"], sha256_file(tokenizer_path)
    if actual != recorded:
        raise DataFormatError(f"tokenizer {tokenizer_path} (sha256 {actual[:16]}...) differs from the one "
                              f"recorded in {Path(dataset_dir) / MANIFEST_FILE} (sha256 {recorded[:16]}...); "
                              "the dataset was tokenised with a different tokenizer")


def check_compatible(dataset: TokenDataset, vocab_size: int | None, seq_len: int) -> None:
    """Raise DataFormatError if a config's ``model.vocab_size`` or ``data.seq_len`` doesn't fit ``dataset``."""
    if vocab_size is not None and vocab_size != dataset.vocab_size:
        raise DataFormatError(f"model.vocab_size={vocab_size} disagrees with the dataset {dataset.path} "
                              f"(vocab_size={dataset.vocab_size}); set model.vocab_size={dataset.vocab_size}")
    if seq_len <= 0 or seq_len > dataset.num_tokens:
        raise DataFormatError(f"data.seq_len={seq_len} must be in [1, {dataset.num_tokens}], the number of "
                              f"tokens in split '{dataset.split}' of {dataset.path}")
