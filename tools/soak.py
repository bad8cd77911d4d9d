#!/usr/bin/env python
"""Soak test: kill, signal and resume a tiny 2-process run again and again; count what is lost.

    python tools/soak.py --trials 20 --seed 0
    python tools/soak.py --trials 3 --seed 7 --workdir /tmp/soak --keep_files

Each trial trains the same tiny FLM (a generated dataset, CPU, gloo) under
``torchrun`` with ``--signals_to_handle ...,SIGUSR1`` (the SLURM recipe of
docs/reliability.md). It launches the run 1-3 times with a fault chosen by the
seeded RNG, then once without, every launch with ``--resume=auto``:

* ``kill@POINT``: SIGKILL of rank 0, rank 1 or every rank at a random step, while
  writing a checkpoint, between the files and the COMPLETE marker, or while
  pruning an old checkpoint (``FLM_FAULT``, see flm/faults.py);
* ``usr1`` / ``term``: the signal reaches one rank only, at a random step;
* ``external SIGKILL``: the whole process tree (agent and workers) is killed at a
  random moment (a random delay after a random logged step): what a node loss or
  a scheduler's kill does;
* ``agent SIGUSR1``: the signal a scheduler sends before the time limit, to the
  torchrun agent, which forwards it to the workers.

After every launch it checks that the newest ``keep_checkpoints`` checkpoints that
were committed (rank 0 logged "committed checkpoint") are still complete, and
that the next launch resumes from the newest of them. After the clean launch the
final weights and EMA must equal an uninterrupted run's bit for bit and every
logged step must appear once, with the same loss. Prints each trial and then
``trials``, ``failures`` and ``bytes of complete checkpoints lost``; exits 1 if
any trial failed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fire  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from flm import checkpoint as ckpt  # noqa: E402
from flm import loading  # noqa: E402

STEPS, CKPT_EVERY, KEEP = 12, 3, 2
TINY = ["--config", str(REPO / "configs/tiny.py"), "--model.seq_len=32", "--model.dim=32", "--model.n_layers=2",
        "--model.n_heads=2", "--model.cond_dim=16", "--batch_size=8", "--log_every=2", "--eval_every=1000",
        "--sample_every=1000", f"--ckpt_every={CKPT_EVERY}", "--optim.schedule=constant",
        "--optim.warmup_steps=2", "--data.num_workers=0", "--sample_steps=[2]", "--eval_batches=1",
        "--num_samples=1", f"--steps={STEPS}", f"--keep_checkpoints={KEEP}", "--dist.timeout_s=60"]
CKPT_STEPS = list(range(CKPT_EVERY, STEPS + 1, CKPT_EVERY))
WORDS = ("the king and queen of a land far away rode out at dawn with their horses to see what the "
         "night had left upon the hills where shepherds keep sheep and sing of love war bread wine").split()


def make_dataset(root: Path) -> tuple[Path, int]:
    """A small seeded pseudo-English dataset (train + validation) with its own tokenizer."""
    from flm.data import Tokenizer, train_tokenizer, write_dataset

    rng = random.Random(0)
    docs = [" ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(rng.randint(3, 8))) for _ in range(300)]
    tok = Tokenizer.load(train_tokenizer(docs, root / "tok", 384))
    enc = [np.asarray(tok.encode(d), dtype=np.int64) for d in docs]
    write_dataset(root / "ds", {"train": enc[:270], "validation": enc[270:]}, tok.path, tok.vocab_size, tok.eos_id,
                  frame_tokens=1024, shard_tokens=8192)
    return root / "ds", tok.vocab_size


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun's workers run in their own sessions)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


class Launch:
    """One torchrun of the run; optional FLM_FAULT, or an external signal at a random moment."""

    def __init__(self, out: Path, data_args: list[str], log: Path, fault: str | None = None):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        env.pop("FLM_FAULT", None)
        if fault:
            env["FLM_FAULT"] = fault
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", str(REPO / "run/train.py"),
               *TINY, *data_args, f"--out_dir={out}"]
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def signal_after(self, pattern: str, delay: float, sig: int, whole_tree: bool, timeout: float = 300) -> bool:
        """Once ``pattern`` is logged, wait ``delay`` s and send ``sig`` (to the agent, or to every
        process of the job at once). False if the run ended first."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        time.sleep(delay)
        if self.proc.poll() is not None:
            return False
        for pid in (descendants(self.proc.pid) if whole_tree else []) + [self.proc.pid]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return True

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in descendants(self.proc.pid) + [self.proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()
            return -999


def committed(text: str) -> list[int]:
    return [int(s) for s in re.findall(r"committed checkpoint \S+/step_(\d{8})", text)]


def resumed(text: str) -> int | None:
    found = re.findall(r"resumed from \S+/step_(\d{8}) \(step", text)
    return int(found[-1]) if found else None


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def final_state(out: Path) -> dict[str, torch.Tensor]:
    path = out / "checkpoints" / f"step_{STEPS:08d}"
    meta = loading.SafeReader(str(path)).read_metadata().state_dict_metadata
    state: dict = {"model": {}, "ema": {}}
    for key, m in meta.items():
        section, _, name = key.partition(".")
        if section in state and not name.endswith("_updates"):
            state[section][name] = torch.empty(m.size, dtype=m.properties.dtype)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        ckpt.load(path, state)
    return {f"{s}.{n}": t for s, d in state.items() for n, t in d.items()}


def logged(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/lr" in r]
    if len(steps) != len(set(steps)):
        raise AssertionError(f"steps logged twice: {sorted(s for s in set(steps) if steps.count(s) > 1)}")
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def choose_fault(rng: random.Random, start: int) -> str:
    """A fault that can still fire in a run resuming at ``start``."""
    later = [s for s in CKPT_STEPS if s > start]
    prunable = [s for s in later if s >= CKPT_EVERY * (KEEP + 1)]
    options = ["kill@step", "external SIGKILL", "agent SIGUSR1"]
    options += ["usr1", "term"] if start + 1 < STEPS else []  # a signal in the last step changes nothing
    options += ["kill@ckpt_write", "kill@ckpt_before_complete"] if later else []
    options += ["kill@ckpt_prune"] if prunable else []
    kind = rng.choice(options)
    rank = rng.choice(["0", "1", "all"])
    where = "" if rank == "all" else f":rank={rank}"
    if kind == "kill@step":
        return f"kill@step:step={rng.randint(start + 1, STEPS)}{where}"
    if kind in ("usr1", "term"):
        return f"{kind}@step:step={rng.randint(start + 1, STEPS - 1)}:rank={rng.choice('01')}"
    if kind == "kill@ckpt_prune":
        return f"kill@ckpt_prune:step={rng.choice(prunable)}:rank=0"
    if kind.startswith("kill@"):
        return f"{kind}:step={rng.choice(later)}{where}"
    return kind


def trial(index: int, rng: random.Random, root: Path, data_args: list[str], reference: Path,
          sizes: dict[int, int]) -> tuple[list[str], int, list[str]]:
    """Run one trial; returns (what happened, bytes lost, problems)."""
    out = root / f"trial{index:02d}"
    shutil.rmtree(out, ignore_errors=True)
    events, lost, problems, done = [], 0, [], []
    start, expected_resume = 0, None
    faults = rng.randint(1, 3)
    for n in range(faults + 1):
        fault = choose_fault(rng, start) if n < faults and start < STEPS else None
        clean = fault is None
        log = root / f"trial{index:02d}.launch{n}.log"
        launch = Launch(out, data_args, log, fault if fault and "@" in fault else None)
        note = fault or "clean"
        if fault in ("external SIGKILL", "agent SIGUSR1"):
            step = rng.choice([s for s in range(2, STEPS - 3, 2) if s > start] or [STEPS - 4])  # logged steps
            delay = round(rng.uniform(0, 0.4), 2)
            sent = launch.signal_after(rf"\] step {step} \|", delay,
                                       signal.SIGKILL if fault == "external SIGKILL" else signal.SIGUSR1,
                                       whole_tree=fault == "external SIGKILL")
            note += f" after step {step} + {delay}s" + ("" if sent else " (the run ended first)")
        code = launch.wait()
        text = launch.text()
        got = resumed(text)
        if got != expected_resume:
            problems.append(f"launch {n} resumed from {got}, expected {expected_resume}")
        done += committed(text)
        newest = sorted(set(done))[-KEEP:]
        for s in newest:  # committed and not yet due for pruning: must still be complete
            problem = ckpt.verify(out / "checkpoints" / f"step_{s:08d}")
            if problem:
                lost += sizes[s]
                problems.append(f"after launch {n}: committed checkpoint {s} is broken ({problem})")
        expected_resume = newest[-1] if newest else None
        start = expected_resume or 0
        events.append(f"{note} -> exit {code}, resume at {start}")
        if clean:
            if code != 0:
                problems.append(f"the clean launch exited {code}")
            break
    try:
        a, b = final_state(reference), final_state(out)
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            problems.append("final weights differ from the uninterrupted run")
        ref, got = logged(reference), logged(out)
        if sorted(ref) != sorted(got) or any(abs(ref[s] - got[s]) > 1e-12 * abs(ref[s]) for s in ref):
            problems.append(f"logged losses differ: {got} vs {ref}")
    except Exception as e:  # noqa: BLE001 - any failure to compare is a failed trial
        problems.append(f"could not compare with the uninterrupted run: {type(e).__name__}: {e}")
    return events, lost, problems


def main(trials: int = 20, seed: int = 0, workdir: str | None = None, keep_files: bool = False) -> int:
    """Run ``trials`` seeded trials; print each and a summary; return the number of failed trials."""
    started = time.perf_counter()
    root = Path(workdir or tempfile.mkdtemp(prefix="flm-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    data, vocab = make_dataset(root / "data")
    data_args = [f"--data.path={data}", f"--model.vocab_size={vocab}"]
    reference = root / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    ref_launch = Launch(reference, data_args + [f"--keep_checkpoints={STEPS}"], root / "reference.log")
    if ref_launch.wait() != 0:
        raise SystemExit(f"the uninterrupted reference run failed:\n{ref_launch.text()[-3000:]}")
    sizes = {s: size(reference / "checkpoints" / f"step_{s:08d}") for s in CKPT_STEPS}
    rng = random.Random(seed)
    failures, lost_total = 0, 0
    for i in range(trials):
        t0 = time.perf_counter()
        events, lost, problems = trial(i, random.Random(rng.getrandbits(64)), root, data_args, reference, sizes)
        failures += bool(problems)
        lost_total += lost
        print(f"trial {i:2d} ({time.perf_counter() - t0:4.0f} s): " + "; ".join(events)
              + ("" if not problems else "\n    FAILED: " + "\n    FAILED: ".join(problems)), flush=True)
    print(f"trials {trials}, failures {failures}, bytes of complete checkpoints lost {lost_total}, "
          f"wall {time.perf_counter() - started:.0f} s, seed {seed}")
    if not keep_files and workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"files: {root}")
    return failures


if __name__ == "__main__":
    sys.exit(1 if fire.Fire(main, serialize=lambda _: None) else 0)
