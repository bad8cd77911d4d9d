"""Single-process checks of the checkpoint module (multi-process resume is in
test_train_distributed.py and test_faults.py)."""

import errno
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import filesystem

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


# ---- faults: kills mid-save and mid-prune, full disks, read-only directories, config changes ----


def _shards(path):
    return sorted(p for p in path.iterdir() if p.suffix == ".distcp")


def test_half_deleted_checkpoint_with_marker_is_skipped(tmp_path):
    for step in (1, 2):
        _save(tmp_path, step, keep=5)
    newest = tmp_path / "checkpoints" / "step_00000002"
    _shards(newest)[0].unlink()  # what a kill in the middle of an old-style rmtree leaves
    assert "missing" in ckpt.verify(newest)
    assert ckpt.resolve_resume("auto", tmp_path).name == "step_00000001"
    shard = _shards(tmp_path / "checkpoints" / "step_00000001")[0]
    shard.write_bytes(shard.read_bytes()[:10])  # a torn file
    assert "truncated" in ckpt.verify(shard.parent)
    assert ckpt.resolve_resume("auto", tmp_path) is None


def test_pruning_renames_before_deleting_and_leftovers_are_removed(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    _save(tmp_path, 2)

    def killed(*args, **kwargs):  # stands in for a SIGKILL between the rename and the deletion
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 3)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    trash = [p.name for p in root.iterdir() if p.name.startswith(ckpt.TRASH)]
    assert len(trash) == 1 and trash[0].startswith(".trash-step_00000001")
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_00000002", "step_00000003"]
    assert ckpt.resolve_resume("auto", tmp_path).name == "step_00000003"
    assert not any(p.name.startswith(ckpt.TRASH) for p in root.iterdir())  # removed at the start


def _fail_mid_write(monkeypatch, error):
    """The first file DCP writes gets some bytes, then ``error`` (a full disk, a read-only directory)."""
    real = filesystem._write_item

    def write_item(transforms, stream, data, *args, **kwargs):
        stream.write(b"partial")
        raise error

    monkeypatch.setattr(filesystem, "_write_item", write_item)
    return real


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   PermissionError(errno.EACCES, "Permission denied")])
def test_failed_save_names_the_path_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, error):
    _save(tmp_path, 1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step_00000001").iterdir()}
    _fail_mid_write(monkeypatch, error)
    target = tmp_path / "checkpoints" / "step_00000002"
    with pytest.raises(loading.CheckpointError) as info:
        ckpt.save(tmp_path, 2, _state(2), keep=1)
    message = str(info.value)
    assert f"could not write checkpoint {target}" in message and error.strerror in message
    assert f"newest complete checkpoint {tmp_path / 'checkpoints' / 'step_00000001'} is untouched" in message
    assert not target.exists()
    monkeypatch.undo()
    assert ckpt.resolve_resume("auto", tmp_path).name == "step_00000001"
    after = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step_00000001").iterdir()}
    assert after == before


def test_read_only_checkpoint_directory(tmp_path, monkeypatch):
    """chmod where it works; as root (which writes anyway) the OSError is injected instead."""
    _save(tmp_path, 1)
    root = tmp_path / "checkpoints"
    if os.geteuid() != 0:
        root.chmod(0o555)
    else:
        _fail_mid_write(monkeypatch, PermissionError(errno.EACCES, "Permission denied"))
        real_write_text = type(root).write_text

        def write_text(self, *args, **kwargs):
            if self.parent == root:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_write_text(self, *args, **kwargs)

        monkeypatch.setattr(type(root), "write_text", write_text)
    try:
        with pytest.raises(loading.CheckpointError, match=f"checkpoint directory {root} is not writable"):
            ckpt.resolve_resume("auto", tmp_path)  # at the start of a run, not at its first save
        with pytest.raises(loading.CheckpointError, match="could not (write|prepare) checkpoint"):
            ckpt.save(tmp_path, 2, _state(2), keep=1)
    finally:
        root.chmod(0o755)
    monkeypatch.undo()
    assert ckpt.resolve_resume("auto", tmp_path).name == "step_00000001"


def test_config_changes_refused_or_allowed():
    from flm.config import Config

    old = json.loads(Config().to_json())
    new = json.loads(Config().to_json())
    new["model"]["dim"] = 1024
    new["objective"] = "mdlm"
    new["optim"]["lr"] = 1e-4
    new["steps"] = 5000
    new["data"]["path"] = "elsewhere"
    del old["max_bad_steps"]  # a field this checkpoint's flm did not have yet
    refused, allowed = ckpt.config_changes(old, new)
    assert refused == ["model.dim: 768 -> 1024", "objective: 'flm' -> 'mdlm'"]
    assert allowed == ["data.path: 'data/shakespeare/tokens' -> 'elsewhere'", "max_bad_steps: (absent) -> 10",
                       "optim.lr: 0.0003 -> 0.0001", "steps: 1000 -> 5000"]


def _train_only_checkpoint(tmp_path, config: dict, dataset: dict) -> Path:
    state = {"train": {"step": 3, "config": json.dumps(config), "provenance": "{}",
                       "dataset": json.dumps(dataset)}}
    return ckpt.save(tmp_path, 3, state, keep=1)


def test_resume_refuses_another_model_objective_or_tokenizer(tmp_path, caplog):
    from flm.config import Config

    config = json.loads(Config().to_json())
    path = _train_only_checkpoint(tmp_path, config, {"tokenizer_sha256": "a" * 64, "vocab_size": 8192})

    def state(dataset, **changes):
        cfg = Config()
        for key, value in changes.items():
            section, _, name = key.rpartition("__")
            setattr(getattr(cfg, section) if section else cfg, name, value)
        return ckpt.TrainState(tmp_path, None, None, None, None, None, cfg.to_json(), dataset=dataset)

    same = {"tokenizer_sha256": "a" * 64, "vocab_size": 8192}
    with pytest.raises(loading.CheckpointError) as info:
        state({"tokenizer_sha256": "b" * 64, "vocab_size": 8192}, model__seq_len=256, objective="ar").check(path)
    message = str(info.value)
    assert "model.seq_len: 128 -> 256" in message and "objective: 'flm' -> 'ar'" in message
    assert "dataset tokenizer sha256: aaaaaaaaaaaaaaaa... -> bbbbbbbbbbbbbbbb..." in message
    with caplog.at_level("INFO", logger="flm"):
        state(same, optim__lr=1e-3, log_every=5).check(path)  # allowed, and said so
    assert "log_every: 10 -> 5; optim.lr: 0.0003 -> 0.001" in caplog.text


def test_single_process_save_and_load_run_no_collectives(tmp_path, mesh, monkeypatch):
    """With one process, DCP's plan collectives are skipped (``no_dist``): gloo would run
    them on its worker thread, whose OpenMP team then slows every later CPU step."""
    import torch.distributed as dist

    calls = []
    for name in ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list",
                 "all_reduce", "barrier"):
        original = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _name=name, _f=original, **k: (calls.append(_name), _f(*a, **k))[1])
    path = _save(tmp_path, 7)
    target = {"ema": {"w": torch.zeros(3, 2), "b": torch.zeros(4)}, "train": {"step": 0}}
    ckpt.load(path, target)
    assert target["train"]["step"] == 7
    assert calls == []
