"""Shared fixtures of the data-pipeline tests: tiny generated corpora, tokenizer and datasets."""

from __future__ import annotations

import importlib.util
import random
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from flm.data import train_tokenizer, write_dataset

REPO = Path(__file__).resolve().parents[1]
DATA_TINY_VOCAB = 400

_WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at "
          "which but have an they you were her she there been one all we their has would when what "
          "king lord queen night love death crown sword speak heart house fair noble gentle truth "
          "honour battle shadow morning river stone letter father daughter brother friend enemy").split()


def english_like_text(seed: int, sentences: int = 40) -> str:
    """Deterministic English-looking text: capitalised sentences of common words, in paragraphs."""
    rng = random.Random(seed)
    lines = []
    for i in range(sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        lines.append(" ".join(words).capitalize() + rng.choice(".,;!?"))
        if i % 5 == 4:
            lines.append("")
    return "\n".join(lines) + "\n"


def load_data_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` as a module (tools are scripts, not a package)."""
    module_name = f"flm_tools_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, REPO / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@pytest.fixture
def tiny_text_dir(tmp_path: Path) -> Path:
    """A directory of 12 small English-like .txt documents."""
    directory = tmp_path / "text"
    directory.mkdir()
    for i in range(12):
        (directory / f"doc{i:02d}.txt").write_text(english_like_text(i, sentences=15 + i))
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BPE tokenizer of DATA_TINY_VOCAB pieces trained on a few KB of generated text."""
    texts = [english_like_text(100 + i) for i in range(10)]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tiny", DATA_TINY_VOCAB)


BERT_LIKE_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "king", "queen", "speak", "##s", ".", ","]


@pytest.fixture(scope="session")
def bert_like_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT-like WordPiece tokenizer.json (ids: BERT_LIKE_VOCAB order; [CLS]=2, [SEP]=3, [PAD]=0).

    Its post-processor adds [CLS] ... [SEP] as BERT's does, which flm must not apply.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    tok = HFTokenizer(models.WordPiece({piece: i for i, piece in enumerate(BERT_LIKE_VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    tok.add_special_tokens(BERT_LIKE_VOCAB[:5])
    path = tmp_path_factory.mktemp("bert_like") / "tokenizer.json"
    tok.save(str(path))
    return path


def random_documents(seed: int, count: int, vocab_size: int = DATA_TINY_VOCAB,
                     max_len: int = 120) -> list[np.ndarray]:
    """``count`` documents of random ids in [3, vocab_size) (never EOS) with 0..max_len tokens."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, rng.integers(0, max_len)) for _ in range(count)]


def packed_stream(documents: list[np.ndarray], eos_id: int = 2) -> np.ndarray:
    """The token stream the writer should produce: each document followed by EOS."""
    return np.concatenate([np.append(doc, eos_id) for doc in documents])


@pytest.fixture
def make_tiny_dataset(tmp_path: Path, tiny_tokenizer: Path) -> Callable[..., Path]:
    """Factory: write random documents as a small dataset with tiny frames and shards."""

    def make(name: str = "tokens", train_docs: int = 60, validation_docs: int = 8,
             frame_tokens: int = 16, shard_tokens: int = 256, seed: int = 0) -> Path:
        splits = {"train": random_documents(seed, train_docs),
                  "validation": random_documents(seed + 1, validation_docs)}
        out = tmp_path / name
        write_dataset(out, splits, tiny_tokenizer, DATA_TINY_VOCAB, 2,
                      frame_tokens=frame_tokens, shard_tokens=shard_tokens)
        return out

    return make


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Trainer overrides pointing at a small real dataset (see tests/_synthetic.py)."""
    from _synthetic import make_dataset

    path, vocab = make_dataset(tmp_path_factory.mktemp("trainer_data"))
    return [f"--data.path={path}", f"--model.vocab_size={vocab}"]


@pytest.fixture
def mesh():
    """A one-process gloo group and its 1-D mesh (FSDP2 over one rank)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("shard",))
    finally:
        dist.destroy_process_group()
