"""Multi-process training on CPU (gloo): exact resume, world-size change, two-node HSDP."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _synthetic import REPO, TINY, subprocess_env, losses, torchrun
from flm import loading

def final_weights(out_dir: Path, step: int) -> dict[str, torch.Tensor]:
    path = out_dir / "checkpoints" / f"step_{step:08d}"
    names = [k[len("model."):] for k in loading.read_keys(path) if k.startswith("model.")]
    return loading.load_weights(path, names, which="model")


def test_exact_resume_and_world_size_change(tmp_path, dataset):
    full, split, one = tmp_path / "full", tmp_path / "split", tmp_path / "one"
    torchrun(2, TINY + dataset + ["--steps=6", f"--out_dir={full}"])
    torchrun(2, TINY + dataset + ["--steps=3", f"--out_dir={split}"])  # "preempted" at step 3
    torchrun(2, TINY + dataset + ["--steps=6", f"--out_dir={split}"])  # resume=auto
    reference = losses(full)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    assert losses(split) == reference  # bit-identical at every step
    a, b = final_weights(full, 6), final_weights(split, 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Continue the 2-process checkpoint on 1 process: same data and noise, so the
    # losses differ only by the order of floating-point reductions.
    (one / "checkpoints").mkdir(parents=True)
    shutil.copytree(split / "checkpoints" / "step_00000003", one / "checkpoints" / "step_00000003")
    torchrun(1, TINY + dataset + ["--steps=6", f"--out_dir={one}"])
    resumed = losses(one)
    assert sorted(resumed) == [4, 5, 6]
    for step, value in resumed.items():
        assert value == pytest.approx(reference[step], rel=1e-5, abs=1e-6)
        assert value != pytest.approx(reference[1], rel=1e-6)  # the model did move


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args: list[str], timeout: int = 300) -> None:
    """Two torchrun agents on 127.0.0.1 acting as two nodes of 2 processes each."""
    port = _free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}",
               str(REPO / "run/train.py"), *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-6000:]


def test_two_node_hsdp_train_and_resume(tmp_path, dataset):
    out = tmp_path / "hsdp"
    args = TINY + dataset + ["--dist.replicate=-1", "--ckpt_every=2", f"--out_dir={out}"]
    two_nodes(args + ["--steps=2"])
    two_nodes(args + ["--steps=4"])
    logged = losses(out)
    assert sorted(logged) == [1, 2, 3, 4]
    assert all(v == v and v < 10 for v in logged.values())
    assert (out / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    config = json.loads((out / "checkpoints" / "step_00000004" / "config.json").read_text())
    assert config["dist"]["replicate"] == -1
