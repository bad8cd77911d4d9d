"""A small real dataset for trainer tests: seeded pseudo-English, a sentencepiece
tokenizer trained on it, written in the project's shard format."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
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


# ---- launching run/train.py in tests ----

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", str(REPO / "configs/tiny.py"), "--model.seq_len=32", "--model.dim=32", "--model.n_layers=2",
        "--model.n_heads=2", "--model.cond_dim=16", "--batch_size=8", "--log_every=1", "--eval_every=1000",
        "--sample_every=1000", "--ckpt_every=3", "--optim.schedule=constant", "--optim.warmup_steps=2",
        "--data.num_workers=0", "--sample_steps=[2]", "--eval_batches=1", "--num_samples=1"]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def torchrun(nproc: int, args: list[str], timeout: int = 300) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "run/train.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def losses(out_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
