"""Single-process fault tests: a full disk or read-only directory under tools/export.py and
tools/pretokenize.py, metrics after a resume, and the FLM_FAULT parser (test_faults.py has
the multi-process ones, test_checkpoint.py the checkpoint directory)."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from conftest import load_data_tool
from flm import checkpoint as ckpt
from flm import faults, loading
from flm.metrics import Logger, LossWindow, truncate_jsonl

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _checkpoint(tmp_path):
    state = {"ema": {"w": torch.ones(64, 64)}, "model": {"w": torch.zeros(64, 64)},
             "train": {"step": 1, "config": "{}"}}
    path = ckpt.save(tmp_path / "run", 1, state, keep=1)
    (path / "config.json").write_text(json.dumps({"objective": "flm", "model": {"dim": 2}}))
    return path


def _partial_then(error):
    def write(obj, f, *args, **kwargs):  # some bytes reach the file, then the disk is full
        with open(f, "wb") as fh:
            fh.write(b"\0" * 100)
        raise error
    return write


def test_export_on_a_full_disk_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    path = _checkpoint(tmp_path)
    out = tmp_path / "model.pt"
    out.write_bytes(b"the previous export")
    monkeypatch.setattr(torch, "save", _partial_then(ENOSPC))
    with pytest.raises(loading.CheckpointError, match=f"could not write {out} .*No space left on device"):
        loading.export(path, out)
    assert out.read_bytes() == b"the previous export"  # untouched, not half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "run"]  # no temporary file left

    export = load_data_tool("export")
    with pytest.raises(SystemExit, match=f"export: error: could not write {tmp_path / 'new.pt'}"):
        export.main(str(path), str(tmp_path / "new.pt"))
    assert not (tmp_path / "new.pt").exists()
    monkeypatch.undo()
    export.main(str(path), str(tmp_path / "new.pt"))
    assert torch.equal(loading.load_weights(tmp_path / "new.pt", ["w"])["w"], torch.ones(64, 64))


def test_export_into_a_read_only_directory(tmp_path, monkeypatch):
    path = _checkpoint(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
    else:  # root writes anyway: inject what the kernel would say
        monkeypatch.setattr(torch, "save", _partial_then(PermissionError(errno.EACCES, "Permission denied")))
    try:
        with pytest.raises(loading.CheckpointError, match=f"could not write {ro / 'model.pt'}"):
            loading.export(path, ro / "model.pt")
    finally:
        ro.chmod(0o755)
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("kind", ["full disk", "read-only"])
def test_pretokenize_failure_leaves_no_dataset(tmp_path, tiny_text_dir, monkeypatch, kind):
    from flm.data import shard_writer

    pretokenize = load_data_tool("pretokenize").pretokenize
    out = tmp_path / "tokens"
    if kind == "full disk":  # ENOSPC in the middle of the shards, after some frames were written
        real, calls = shard_writer._ShardFile._write, []

        def write(self, data):
            calls.append(len(data))
            if len(calls) == 3:
                raise ENOSPC
            real(self, data)

        monkeypatch.setattr(shard_writer._ShardFile, "_write", write)
        expected = "No space left on device"
    elif os.geteuid() != 0:
        tmp_path.chmod(0o555)
        expected = "Permission denied"
    else:  # root writes anyway: fail the first write into the new directory
        def copyfile(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(args[1]))

        monkeypatch.setattr(shard_writer.shutil, "copyfile", copyfile)
        expected = "Permission denied"
    try:
        with pytest.raises(OSError, match=f"could not write the dataset {out} .*{expected}.*nothing was left"):
            pretokenize(inputs=str(tiny_text_dir), out=str(out), vocab_size=400, workers=1, frame_tokens=64,
                        shard_tokens=256)
    finally:
        tmp_path.chmod(0o755)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tokens")]  # no temporary directory either


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in (1, 2, 3, 4, 5)]
    jsonl.write_text("\n".join(lines) + '\n{"step": 6, "train/lo')  # torn by a kill
    assert truncate_jsonl(jsonl, 3) == 3
    assert [json.loads(line)["step"] for line in jsonl.read_text().splitlines()] == [1, 2, 3]
    logger = Logger(tmp_path / "tb", enabled=True, jsonl=jsonl, start=2)
    logger.scalars(3, {"loss": 0.5}, "train/")
    logger.close()
    assert [json.loads(line)["step"] for line in jsonl.read_text().splitlines()] == [1, 2, 3]


def test_loss_window_survives_a_checkpoint():
    window = LossWindow(torch.device("cpu"))
    window.add(torch.tensor([1.0, 2.0], dtype=torch.float64), torch.ones(2, 10, dtype=torch.float64))
    state = json.loads(json.dumps(window.state_dict()))
    restored = LossWindow(torch.device("cpu"))
    restored.load_state_dict(state)
    window.add(torch.tensor([3.0, 4.0], dtype=torch.float64), torch.ones(2, 10, dtype=torch.float64))
    restored.add(torch.tensor([3.0, 4.0], dtype=torch.float64), torch.ones(2, 10, dtype=torch.float64))
    a, b = window.read(), restored.read()
    assert a[2] == b[2] == 2 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert restored.steps == 0 and restored.loss.sum() == 0


def test_fault_specs_parse_and_reject_typos():
    parsed = faults.parse("kill@ckpt_before_complete:step=6:rank=1; nan@loss:step=4,5")
    assert parsed == (faults.Fault("kill", "ckpt_before_complete", frozenset({6}), 1),
                      faults.Fault("nan", "loss", frozenset({4, 5}), None))
    with pytest.raises(ValueError, match="action@point"):
        faults.parse("explode@step")
    with pytest.raises(ValueError, match="unknown condition"):
        faults.parse("kill@step:steps=3")
    assert faults.parse("") == () and faults._FAULTS == ()  # unset in tests: every hook is a no-op
