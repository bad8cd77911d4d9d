"""Flow-map distillation through run/train.py: exact resume, teacher provenance,
stage 2 from stage 1, and sampling every model kind."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from flm.sampling import load_sampler
from _synthetic import REPO, TINY, subprocess_env, losses, torchrun

SMALL = ["--batch_size=4", "--ckpt_every=2", "--data.num_workers=0", "--log_every=1", "--eval_every=1000",
         "--sample_every=1000", "--sample_steps=[1]", "--eval_batches=1", "--num_samples=1",
         "--optim.warmup_steps=1", "--distill.boundary_prob=4", "--keep_checkpoints=3"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, dataset):
    out = tmp_path_factory.mktemp("teacher")
    torchrun(1, TINY + dataset + ["--steps=3", f"--out_dir={out}"])
    return out / "checkpoints" / "step_00000003", dataset


def _distill(nproc, stage, out, teacher_path, dataset, steps, extra=()):
    args = ["--config", str(REPO / f"configs/tiny_distill{stage}.py"), "--model.seq_len=32", *dataset, *SMALL,
            f"--distill.teacher={teacher_path}", f"--steps={steps}", f"--out_dir={out}", *extra]
    torchrun(nproc, args)


def test_stage1_exact_resume_then_stage2_and_samplers(tmp_path, teacher):
    teacher_path, dataset = teacher
    full, split = tmp_path / "full", tmp_path / "split"
    _distill(2, 1, full, teacher_path, dataset, 4)
    _distill(2, 1, split, teacher_path, dataset, 2)
    _distill(2, 1, split, teacher_path, dataset, 4)
    assert sorted(losses(full)) == [1, 2, 3, 4]
    assert losses(split) == losses(full)
    # Per-example noise and globally drawn intervals: 1 process continues the
    # 2-process run with the same data, times and noise (up to reduction order).
    one = tmp_path / "one"
    shutil.copytree(split / "checkpoints" / "step_00000002", one / "checkpoints" / "step_00000002")
    _distill(1, 1, one, teacher_path, dataset, 4)
    for step, value in losses(one).items():
        assert value == pytest.approx(losses(full)[step], rel=1e-4, abs=1e-7)

    stage1 = full / "checkpoints" / "step_00000004"
    _distill(1, 2, tmp_path / "s2", teacher_path, dataset, 2, [f"--distill.stage1={stage1}"])
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    for path, kind, nfe in ((teacher_path, "flm", 3), (stage1, "fmlm_stage1", 6),
                            (tmp_path / "s2" / "checkpoints" / "step_00000002", "fmlm_stage2", 3)):
        sampler = load_sampler(path)
        ids, evaluations = sampler.generate(2, 3, gen())
        assert sampler.kind == kind and evaluations == nfe
        assert ids.shape == (2, 32) and int(ids.max()) < sampler.vocab_size


def test_resume_refuses_a_different_teacher(tmp_path, teacher):
    teacher_path, dataset = teacher
    out = tmp_path / "run"
    _distill(1, 1, out, teacher_path, dataset, 2)
    other = tmp_path / "other_teacher" / "checkpoints" / teacher_path.name
    shutil.copytree(teacher_path, other)
    (other / "COMPLETE").write_text('{"step": 3, "copy": true}')  # a different checkpoint
    args = ["--config", str(REPO / "configs/tiny_distill1.py"), "--model.seq_len=32", *dataset, *SMALL,
            f"--distill.teacher={other}", "--steps=4", f"--out_dir={out}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(REPO / "run/train.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "was trained from" in proc.stdout + proc.stderr


def test_stage2_needs_a_stage1_map(tmp_path, teacher):
    teacher_path, dataset = teacher
    args = ["--config", str(REPO / "configs/tiny_distill2.py"), "--model.seq_len=32", *dataset, *SMALL,
            f"--distill.teacher={teacher_path}", f"--distill.stage1={teacher_path}", "--steps=1",
            f"--out_dir={tmp_path / 'x'}"]
    cmd = [sys.executable, str(REPO / "run/train.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "expected fmlm_stage1" in proc.stderr
