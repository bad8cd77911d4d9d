"""MDLM, AR and an SDTT round through run/train.py: exact resume on 2 processes and 2 -> 1,
sampling at any step count, and one evaluation table with FLM, MDLM, SDTT and AR rows."""

from __future__ import annotations

import shutil

import pytest
import torch

from _synthetic import TINY, losses, torchrun
from flm.eval.harness import evaluate
from flm.loading import read_config
from flm.sampling import load_sampler

STEPS = ["--ckpt_every=2", "--sample_every=4", "--sample_steps=[1,3]"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset) -> dict[str, object]:
    """For each baseline: 4 steps on 2 processes, the same run stopped at 2 and resumed,
    and the 2-process checkpoint at step 2 continued on 1 process."""
    root = tmp_path_factory.mktemp("methods")
    out = {}
    for method in ("mdlm", "ar", "sdtt"):
        args = TINY + dataset + STEPS + [f"--objective={method}"]
        if method == "sdtt":  # one round from the MDLM just trained: 8 teacher steps -> 4
            teacher = out["mdlm"][0] / "checkpoints" / "step_00000004"
            args += [f"--distill.teacher={teacher}", "--distill.teacher_steps=8"]
        full, split, one = root / method / "full", root / method / "split", root / method / "one"
        torchrun(2, args + ["--steps=4", f"--out_dir={full}"])
        torchrun(2, args + ["--steps=2", f"--out_dir={split}"])
        torchrun(2, args + ["--steps=4", f"--out_dir={split}"])
        shutil.copytree(split / "checkpoints" / "step_00000002", one / "checkpoints" / "step_00000002")
        torchrun(1, args + ["--steps=4", f"--out_dir={one}"])
        out[method] = (full, split, one)
    flm = root / "flm"
    torchrun(1, TINY + dataset + STEPS + ["--steps=2", f"--out_dir={flm}"])
    out["flm"] = flm
    return out


@pytest.mark.parametrize("method", ["mdlm", "ar", "sdtt"])
def test_exact_resume_and_world_size_change(runs, method):
    full, split, one = runs[method]
    reference = losses(full)
    assert sorted(reference) == [1, 2, 3, 4]
    assert losses(split) == reference
    resumed = losses(one)
    assert sorted(resumed) == [3, 4]
    for step, value in resumed.items():
        assert value == pytest.approx(reference[step], rel=1e-5, abs=1e-6)
    assert all(0 < v < 10 for v in reference.values())
    assert read_config(full / "checkpoints" / "step_00000004")["objective"] == method


def test_samplers_of_the_baselines(runs):
    mdlm = load_sampler(runs["mdlm"][0] / "checkpoints" / "step_00000004")
    ar = load_sampler(runs["ar"][0] / "checkpoints" / "step_00000004")
    for steps in (1, 2, 5):
        ids, nfe = mdlm.generate(3, steps, torch.Generator().manual_seed(0))
        assert nfe == steps and ids.shape == (3, 32) and 0 <= int(ids.min()) and int(ids.max()) < mdlm.vocab_size
    ids, nfe = ar.generate(3, 1, torch.Generator().manual_seed(0))
    assert nfe == 32 and ids.shape == (3, 32) and int(ids.max()) < ar.vocab_size and not ar.any_steps


def test_flm_mdlm_and_ar_in_one_table(runs, tmp_path):
    checkpoints = ",".join(str(p) for p in (runs["flm"] / "checkpoints" / "step_00000002",
                                            runs["mdlm"][0] / "checkpoints" / "step_00000004",
                                            runs["sdtt"][0] / "checkpoints" / "step_00000004",
                                            runs["ar"][0] / "checkpoints" / "step_00000004"))
    pytest.importorskip("matplotlib")
    evaluate(checkpoints, steps="1,2", num_samples=4, batch_size=2, scorer="none", mauve=False,
             out=str(tmp_path), progress=False)
    import json

    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["kind"], r["steps"], r["nfe"]) for r in rows] == [
        ("flm", 1, 1), ("flm", 2, 2), ("mdlm", 1, 1), ("mdlm", 2, 2), ("sdtt", 1, 1), ("sdtt", 2, 2),
        ("ar", 32, 32), ("data", None, None)]
    assert all(r["entropy"] >= 0 for r in rows)
