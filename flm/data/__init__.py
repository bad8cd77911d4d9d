"""flm data pipeline: tokenizer, compressed token shards and resumable loaders.

Text -> ``tools/pretokenize.py`` -> dataset directory (see ``flm.data.shards``)
-> ``build_loader`` -> int64 ``(batch, seq_len)`` batches.

The torch-based loader names are imported on first use, so the text and shard
tools start without importing torch.
"""

import importlib
from typing import Any

from flm.data.shards import (
    DataFormatError,
    TokenDataset,
    check_compatible,
    check_tokenizer,
    load_manifest,
    tokenizer_path,
)
from flm.data.shard_writer import write_dataset
from flm.data.tokenizer import Tokenizer, train_tokenizer

_LOADER_NAMES = ("GlobalBatchSampler", "WindowDataset", "build_loader")

__all__ = [
    "DataFormatError",
    "GlobalBatchSampler",
    "TokenDataset",
    "Tokenizer",
    "WindowDataset",
    "build_loader",
    "check_compatible",
    "check_tokenizer",
    "load_manifest",
    "tokenizer_path",
    "train_tokenizer",
    "write_dataset",
]


def __getattr__(name: str) -> Any:
    if name in _LOADER_NAMES:
        return getattr(importlib.import_module("flm.data.loader"), name)
    raise AttributeError(f"module 'flm.data' has no attribute {name!r}")
