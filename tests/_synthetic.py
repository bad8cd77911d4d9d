"""A small real dataset for trainer tests: seeded pseudo-English, a sentencepiece
tokenizer trained on it, written in the project's shard format."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from flm.data import Tokenizer, train_tokenizer, write_dataset

_WORDS = ("the king and queen of a land far away rode out at dawn with their horses to see "
          "what the night had left upon the hills where shepherds keep sheep and sing of love "
          "war bread wine gold silver rain sun moon stars river sea ship sailor crown sword").split()


def documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(rng.randint(3, 8))]
        docs.append(" ".join(sentences))
    return docs


def make_dataset(root: Path, vocab_size: int = 384, n_docs: int = 300) -> tuple[Path, int]:
    """Write ``root/ds`` (train + validation); return its path and the vocabulary size."""
    docs = documents(n_docs, seed=0)
    model = train_tokenizer(docs, root / "tok", vocab_size)
    tok = Tokenizer.load(model)
    enc = [np.asarray(tok.encode(d), dtype=np.int64) for d in docs]
    cut = n_docs * 9 // 10
    write_dataset(root / "ds", {"train": enc[:cut], "validation": enc[cut:]}, model, tok.vocab_size, tok.eos_id,
                  frame_tokens=1024, shard_tokens=8192)
    return root / "ds", tok.vocab_size
