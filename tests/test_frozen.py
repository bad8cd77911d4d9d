"""Frozen networks of distillation: replicated vs FSDP-sharded placement, and exported
teachers read once per process."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from flm import loading
from flm.config import Config, DistConfig, DistillConfig, ModelConfig
from flm.distributed import apply_activation_checkpointing, materialize, shard_model
from flm.methods import METHODS
from flm.model import DiT

TEACHER = ModelConfig(vocab_size=64, seq_len=16, dim=32, n_layers=2, n_heads=2, cond_dim=16)

pytestmark = [pytest.mark.filterwarnings("ignore:FSDP2-wrapped module .* returned a view tensor")]




def _export(path, objective: str, model_cfg: ModelConfig, seed: int):
    """An exported file as tools/export.py writes it, with random (non-zero) weights."""
    torch.manual_seed(seed)
    net = DiT(model_cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    config = json.dumps({"objective": objective, "model": dataclasses.asdict(model_cfg)})
    torch.save({"config": config, "provenance": "{}", "model": net.state_dict()}, path)
    return path


@pytest.fixture
def exports(tmp_path):
    loading._read_export.cache_clear()
    teacher = _export(tmp_path / "teacher.pt", "flm", TEACHER, 0)
    stage1 = _export(tmp_path / "stage1.pt", "fmlm_stage1", dataclasses.replace(TEACHER, two_times=True), 1)
    return teacher, stage1


def _build(mesh, teacher, stage1, placement: str, precision: str = "bf16"):
    cfg = Config(objective="fmlm_stage2", model=ModelConfig(vocab_size=TEACHER.vocab_size, seq_len=TEACHER.seq_len),
                 distill=DistillConfig(teacher=str(teacher), stage1=str(stage1), frozen_placement=placement),
                 dist=DistConfig(mixed_precision=precision, activation_checkpointing="selective"))
    torch.manual_seed(0)  # as run/train.py: the student's fresh layers (time_emb2) come from this
    method = METHODS[cfg.objective].build(cfg, mesh, torch.device("cpu"))
    with torch.device("meta"):
        student = DiT(cfg.model)
    apply_activation_checkpointing(student, cfg.dist.activation_checkpointing)
    shard_model(student, mesh, precision)
    materialize(student, torch.device("cpu"), reference=lambda: DiT(cfg.model))
    method.init_model(student)
    return method, student


def test_an_exported_teacher_is_read_once_per_process(mesh, exports, monkeypatch):
    teacher, stage1 = exports
    loads = []
    original = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or original(*a, **k))
    method, _ = _build(mesh, teacher, stage1, "replicated")
    # config, objective, fingerprint and weights of each file: one torch.load (mmap) each
    assert sorted(str(p) for p in loads) == sorted([str(teacher), str(stage1)])
    for name, path in (("teacher", teacher), ("stage1", stage1)):
        # the fingerprint is the same content hash as before (provenance records stay valid)
        assert method.provenance[name]["fingerprint"] == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    # a rewritten file is read again
    _export(teacher, "flm", TEACHER, 5)
    assert loading.fingerprint(teacher) == hashlib.sha256(teacher.read_bytes()).hexdigest()[:16]
    assert len(loads) == 3


def test_replicated_frozen_nets_compute_what_sharded_ones_compute(mesh, exports):
    teacher, stage1 = exports
    rep, rep_student = _build(mesh, teacher, stage1, "replicated")
    shd, shd_student = _build(mesh, teacher, stage1, "sharded")
    # replicated: plain bf16 modules, no FSDP; sharded: FSDP2 with fp32 shards
    for net in (rep.teacher, rep.stage1):
        assert not isinstance(net, FSDPModule) and {p.dtype for p in net.parameters()} == {torch.bfloat16}
        assert not any(p.requires_grad for p in net.parameters())
    assert isinstance(shd.teacher, FSDPModule) and isinstance(shd.stage1, FSDPModule)
    # the student starts from the fp32 teacher weights either way (not from the bf16 copy)
    for (name, a), (_, b) in zip(rep_student.named_parameters(), shd_student.named_parameters()):
        assert torch.equal(a.full_tensor(), b.full_tensor()), name
    # FSDP's bf16 mixed precision gathers the same bf16 weights the replicated copy holds
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, TEACHER.seq_len, TEACHER.vocab_size, generator=gen)
    s, t = torch.tensor([0.1, 0.5, 0.0]), torch.tensor([0.3, 0.9, 1.0])
    with torch.no_grad():
        assert torch.equal(rep.teacher(x, s), shd.teacher(x, s))
        assert torch.equal(rep.stage1(x, s, t), shd.stage1(x, s, t))


def test_fp32_runs_keep_fp32_frozen_copies(mesh, exports):
    teacher, stage1 = exports
    method, _ = _build(mesh, teacher, stage1, "replicated", precision="fp32")
    assert {p.dtype for p in method.teacher.parameters()} == {torch.float32}
    reference = loading.load_model(teacher)
    for (name, a), (_, b) in zip(method.teacher.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name


def test_unknown_placement_is_refused(mesh, exports):
    teacher, stage1 = exports
    with pytest.raises(ValueError, match="frozen_placement='everywhere'"):
        _build(mesh, teacher, stage1, "everywhere")
