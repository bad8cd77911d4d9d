"""A small real dataset for trainer tests: seeded pseudo-English, a sentencepiece
tokenizer trained on it, written in the project's shard format."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """``nproc`` ranks of run/train.py started directly, as torchrun's workers would be
    (no agent: each rank's exit code and output are the test's to inspect, and one rank
    can be killed or signalled alone). Output goes to ``<log_dir>/rank<k>.log``."""

    def __init__(self, nproc: int, args: list[str], log_dir: Path, fault: str | None = None):
        log_dir.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        self.logs = [log_dir / f"rank{r}.log" for r in range(nproc)]
        self.procs = []
        for rank in range(nproc):
            env = {**subprocess_env(), "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            env.pop("FLM_FAULT", None)
            if fault:
                env["FLM_FAULT"] = fault
            with open(self.logs[rank], "w") as out:
                self.procs.append(subprocess.Popen([sys.executable, str(REPO / "run/train.py"), *args], cwd=REPO,
                                                   env=env, stdout=out, stderr=subprocess.STDOUT))

    def output(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def wait(self, timeout: float = 240) -> list[int]:
        """Every rank's exit code (negative: killed by that signal)."""
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]
        finally:
            self.kill()

    def wait_for(self, rank: int, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output(rank):
            if time.monotonic() > deadline or self.procs[rank].poll() is not None and text not in self.output(rank):
                raise AssertionError(f"rank {rank} never printed {text!r}:\n{self.output(rank)[-3000:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def summary(self) -> str:
        return "\n".join(f"--- rank {r} (exit {p.returncode}):\n{self.output(r)[-4000:]}"
                         for r, p in enumerate(self.procs))


def launch(nproc: int, args: list[str], log_dir: Path, fault: str | None = None,
           expect: int | tuple[int, ...] = 0, timeout: float = 240) -> Ranks:
    """Run ``nproc`` ranks to the end; assert every rank's exit code is in ``expect``."""
    ranks = Ranks(nproc, args, log_dir, fault)
    codes = ranks.wait(timeout)
    expect = (expect,) if isinstance(expect, int) else expect
    assert all(c in expect for c in codes), f"exit codes {codes}, expected {expect}\n{ranks.summary()}"
    return ranks
