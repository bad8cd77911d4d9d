"""Fault injection on 2 gloo processes (tiny model): kills at any point (also mid-checkpoint
and mid-pruning), pre-emption signals, a full disk, a hung rank, non-finite losses, ranks
that list checkpoints differently. After each fault the automatic resume continues from
the newest complete checkpoint and ends with the uninterrupted run's weights and metrics.

The faults are injected with FLM_FAULT (flm/faults.py); the ranks are started directly
(tests/_synthetic.py: Ranks) so that each rank's exit code is visible. docs/reliability.md
maps every fault to its test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _synthetic import TINY, Ranks, launch
from flm import checkpoint as ckpt
from flm import loading

STEPS = 9
ARGS = [f"--steps={STEPS}", "--log_every=2", "--ckpt_every=3", "--keep_checkpoints=2", "--dist.timeout_s=60"]


def args(dataset: list[str], out: Path, *extra: str) -> list[str]:
    return TINY + dataset + ARGS + [f"--out_dir={out}", *extra]


def weights(out: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    path = out / "checkpoints" / f"step_{step:08d}"
    keys = [k for k in loading.read_keys(path) if k.startswith(("model.", "ema.")) and not k.endswith("_updates")]
    state: dict = {"model": {}, "ema": {}}
    meta = loading.SafeReader(str(path)).read_metadata().state_dict_metadata
    for k in keys:
        section, name = k.split(".", 1)
        state[section][name] = torch.empty(meta[k].size, dtype=meta[k].properties.dtype)
    ckpt.load(path, state)
    return {f"{s}.{n}": t for s, d in state.items() for n, t in d.items()}


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_rows(out: Path) -> dict[int, dict]:
    """The train/ rows by step; a step logged twice is an error."""
    found: dict[int, dict] = {}
    for row in rows(out):
        if "train/lr" in row:
            assert row["step"] not in found, f"step {row['step']} logged twice"
            found[row["step"]] = row
    return found


def assert_same_run(out: Path, reference: Path) -> None:
    """Bit-identical final weights and EMA; the same logged losses, each step once."""
    a, b = weights(reference), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref, got = train_rows(reference), train_rows(out)
    assert sorted(got) == sorted(ref) == [2, 4, 6, 8, 9]
    for step in ref:  # float64 sums reduced in another order after a resume: equal to rounding
        assert got[step]["train/loss"] == pytest.approx(ref[step]["train/loss"], rel=1e-12), step


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset) -> Path:
    """The uninterrupted run every faulty run must end up equal to."""
    root = tmp_path_factory.mktemp("reference")
    launch(2, args(dataset, root / "run"), root / "logs")
    return root / "run"


def test_kill_mid_checkpoint_mid_prune_and_one_rank_then_resume_exactly(tmp_path, dataset, reference):
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    run = args(dataset, out, "--keep_checkpoints=1")

    # The whole job is killed after every rank wrote its files of step 6, before COMPLETE.
    launch(2, run, tmp_path / "1", "kill@ckpt_before_complete:step=6", expect=-9)
    assert (ckpts / "step_00000006" / ".metadata").is_file()
    assert not (ckpts / "step_00000006" / "COMPLETE").exists()
    assert ckpt.resolve_resume("auto", out).name == "step_00000003"

    # Resume. Rank 1 lists no checkpoint at all (a stale shared-filesystem view): rank 0's
    # choice is used. Rank 0 is killed while pruning step 3, after committing step 6.
    r = launch(2, run, tmp_path / "2", "hide@resume_listing:rank=1;kill@ckpt_prune:step=6:rank=0", expect=(-9, 1))
    assert "resumed from" in r.output(0) and "step_00000003 (step 3)" in r.output(0)
    assert any(name.startswith(".trash-step_00000003") for name in checkpoints(out))
    assert ckpt.verify(ckpts / "step_00000006") is None

    # Resume from 6 (the leftover is deleted); rank 1 alone is killed in step 9, after
    # rank 0 logged step 8: rows that the next resume must not duplicate.
    r = launch(2, run, tmp_path / "3", "kill@step:step=9:rank=1", expect=(-9, 1))
    assert "step_00000006 (step 6)" in r.output(0)
    assert checkpoints(out) == ["step_00000006"]
    assert 8 in train_rows(out)
    assert "CollectiveError: rank 0, step 9" in r.output(0)

    # Resume to the end with a harmless setting changed: allowed and logged.
    r = launch(2, run + ["--sample_every=500"], tmp_path / "4")
    assert "sample_every: 1000 -> 500" in r.output(0)
    assert_same_run(out, reference)


def test_preemption_signal_on_one_rank_stops_every_rank_and_resumes_exactly(tmp_path, dataset, reference):
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    run = args(dataset, out)

    # SIGUSR1 reaches rank 1 only, during step 4: both ranks stop after step 4, save, exit 75.
    r = launch(2, run, tmp_path / "1", "usr1@step:step=4:rank=1", expect=75)
    assert "step 4: stop requested (SIGUSR1 on this rank)" in r.output(1)
    assert "step 4: stop requested (a signal on another rank)" in r.output(0)
    assert ckpt.resolve_resume("auto", out).name == "step_00000004"
    assert max(train_rows(out)) == 4

    # SIGTERM reaches rank 0 only, during step 7 (mid log window: 7 is not a log step).
    launch(2, run, tmp_path / "2", "term@step:step=7:rank=0", expect=75)
    assert [p.name for p in ckpt.checkpoint_dirs(out)] == ["step_00000006", "step_00000007"]

    launch(2, run, tmp_path / "3")
    assert_same_run(out, reference)


def test_full_disk_and_hung_rank_fail_clearly_and_keep_the_last_checkpoint(tmp_path, dataset, reference):
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    run = args(dataset, out)

    # Rank 1's disk is full while it writes step 6: every rank stops with the path and the cause.
    r = launch(2, run, tmp_path / "1", "enospc@ckpt_write:step=6:rank=1", expect=1)
    for rank in (0, 1):
        text = r.output(rank)
        assert f"could not write checkpoint {ckpts / 'step_00000006'}" in text
        assert "No space left on device" in text
        assert f"the newest complete checkpoint {ckpts / 'step_00000003'} is untouched" in text
    assert checkpoints(out) == ["step_00000003"] and ckpt.verify(ckpts / "step_00000003") is None

    # Rank 1 hangs in step 5: rank 0's collective times out and names the step and operation;
    # rank 1's watchdog reports where it is stuck (and torchrun would then stop it).
    ranks = Ranks(2, run + ["--dist.timeout_s=10"], tmp_path / "2", "hang@step:step=5:rank=1")
    try:
        assert ranks.procs[0].wait(timeout=120) == 1, ranks.summary()
        ranks.wait_for(1, "rank 1, step 5, forward/backward has not finished")
    finally:
        ranks.kill()
    assert ("CollectiveError: rank 0, step 5, agreement all-reduce (stop / skip flags): a collective failed "
            "or timed out (dist.timeout_s=10)") in ranks.output(0)

    launch(2, run, tmp_path / "3")
    assert_same_run(out, reference)


def test_nonfinite_steps_are_skipped_on_every_rank_then_stop(tmp_path, dataset):
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    run = args(dataset, out, "--log_every=1", "--ckpt_every=1", "--keep_checkpoints=10", "--max_bad_steps=2")
    # NaN on rank 1 only at step 2; on every rank at steps 5 and 6 (two in a row: stop).
    r = launch(2, run, tmp_path / "1", "nan@loss:step=2:rank=1;nan@loss:step=5,6", expect=76)
    for rank in (0, 1):
        assert "step 2: non-finite loss; update skipped on every rank (1 in a row, 1 in all)" in r.output(rank)
        assert (f"stopping: 2 consecutive steps with a non-finite loss or gradient (steps 5-6, max_bad_steps=2). "
                f"The last good weights are in {ckpts / 'step_00000005'}") in r.output(rank)
    assert [p.name for p in ckpt.checkpoint_dirs(out)] == [f"step_{s:08d}" for s in range(1, 6)]

    w = {s: weights(out, s) for s in (1, 2, 3, 4, 5)}
    assert all(torch.equal(w[1][k], w[2][k]) for k in w[1])  # step 2 changed nothing (weights and EMA)
    assert all(torch.equal(w[4][k], w[5][k]) for k in w[4])  # nor did step 5
    assert not all(torch.equal(w[2][k], w[3][k]) for k in w[2])
    state = ckpt.load(ckpts / "step_00000005", {"train": {"scheduler": "", "guard": ""},
                                                "ema": {"_updates": torch.tensor(0)}})
    assert json.loads(state["train"]["scheduler"])["last_epoch"] == 3  # steps 1, 3, 4 were applied
    assert int(state["ema"]["_updates"]) == 3
    assert json.loads(state["train"]["guard"]) == {"skipped": 2, "consecutive": 1}

    logged = train_rows(out)
    assert sorted(logged) == [1, 2, 3, 4, 5]
    assert "train/loss" not in logged[2] and "train/loss" not in logged[5]  # nothing finite to average
    assert [logged[s]["train/skipped_steps"] for s in range(1, 6)] == [0, 1, 1, 1, 2]
    assert all(0 < logged[s]["train/loss"] < 10 for s in (1, 3, 4))
