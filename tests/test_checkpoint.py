"""Single-process checks of the checkpoint module (multi-process resume is in
test_train_distributed.py)."""

import json
import os
import pickle

import pytest
import torch

from flm import checkpoint as ckpt, loading


def _state(step: int) -> dict:
    return {"ema": {"w": torch.full((3, 2), float(step)), "b": torch.arange(4.0)},
            "model": {"w": torch.zeros(3, 2)},
            "train": {"step": step, "config": json.dumps({"model": {"dim": 2}})}}


def _save(out, step, keep=2):
    path = ckpt.save(out, step, _state(step), keep)
    (path / "config.json").write_text(json.dumps({"objective": "flm", "model": {"dim": 2}}))
    return path


def test_complete_marker_keep_last_and_resume(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    names = [p.name for p in ckpt.checkpoint_dirs(tmp_path)]
    assert names == ["step_00000002", "step_00000003"]  # keep=2
    # An interrupted save (no COMPLETE) is ignored by auto-resume.
    broken = tmp_path / "checkpoints" / "step_00000004"
    broken.mkdir()
    (broken / ".metadata").write_bytes(b"partial")
    assert ckpt.resolve_resume("auto", tmp_path).name == "step_00000003"
    assert ckpt.resolve_resume("none", tmp_path) is None
    with pytest.raises(loading.CheckpointError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(broken), tmp_path)


def test_load_fills_state_in_place(tmp_path):
    path = _save(tmp_path, 5)
    target = {"ema": {"w": torch.zeros(3, 2), "b": torch.zeros(4)}, "train": {"step": 0}}
    ckpt.load(path, target)
    assert target["train"]["step"] == 5 and torch.equal(target["ema"]["w"], torch.full((3, 2), 5.0))
    assert loading.load_weights(path, ["w"], which="ema")["w"].sum() == 30


def test_export_round_trip_weights_only(tmp_path):
    path = _save(tmp_path, 7)
    out = loading.export(path, tmp_path / "model.pt")
    data = torch.load(out, weights_only=True)
    assert set(data["model"]) == {"w", "b"} and json.loads(data["config"])["objective"] == "flm"
    assert torch.equal(loading.load_weights(out, ["w"])["w"], torch.full((3, 2), 7.0))
    assert loading.read_config(out)["model"]["dim"] == 2
    assert loading.fingerprint(out) != loading.fingerprint(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_untrusted_pickles_are_refused(tmp_path):
    path = _save(tmp_path, 1)
    (path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(loading.CheckpointError, match="posix.system|os.system|not allowed"):
        loading.read_keys(path)
    evil_export = tmp_path / "evil.pt"
    torch.save({"config": "{}", "model": _Evil()}, evil_export)
    with pytest.raises(loading.CheckpointError, match="weights-only load failed"):
        loading.load_weights(evil_export, ["w"])


def test_missing_weights_named(tmp_path):
    path = _save(tmp_path, 1)
    with pytest.raises(loading.CheckpointError, match="no weight 'ema.nope'"):
        loading.load_weights(path, ["nope"])
    with pytest.raises(loading.CheckpointError, match="no such checkpoint"):
        loading.read_config(tmp_path / "absent.pt")
