"""Online teacher-to-student flow-map distillation inside the training loop.

:class:`Distiller` holds the frozen networks of a distillation run (the FLM
teacher D and, in stage 2, the stage-1 residual g), loads them from sharded or
exported checkpoints (EMA weights) under FSDP2, initialises the student from
the teacher, and exposes the step's loss and the few-step sampler to
``run/train.py``. The maths is in :mod:`flm.flow_map`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from flm import checkpoint as ckpt
from flm.config import Config, ModelConfig, from_dict
from flm.distributed import clean_fqn, local_tensor, mixed_precision, shard_model
from flm.flow_map import (LossWeighting, fmlm_stage1_loss, fmlm_stage2_loss, sample_fmlm,
                          sample_intervals, sample_stage1)
from flm.model import DiT

log = logging.getLogger("flm")


def model_config_of(path: str | Path) -> ModelConfig:
    """The backbone config stored with a checkpoint directory or exported file."""
    return from_dict(ModelConfig, ckpt.read_config(path)["model"])


def load_frozen(path: str | Path, mesh: DeviceMesh | None, precision: str,
                device: torch.device) -> DiT:
    """A frozen network with the EMA weights of ``path``, sharded over ``mesh``.

    With ``mesh=None`` (one process, e.g. ``run/sample.py``) the model is plain.
    """
    path = Path(path)
    mcfg = model_config_of(path)
    if mesh is None:
        net = DiT(mcfg).to(device)
        net.load_state_dict(ckpt.load_weights(path, [n for n, _ in net.named_parameters()]))
    else:
        with torch.device("meta"):
            net = DiT(mcfg)
        shard_model(net, mesh, precision)
        net.to_empty(device=device)
        names = [n for n, _ in net.named_parameters()]
        if path.is_dir():  # each rank reads just its shards
            state = {"ema": {n: p.detach() for n, p in net.named_parameters()}}
            ckpt.load(path, state)
        else:
            full = ckpt.load_weights(path, names)
            set_model_state_dict(net, full, options=StateDictOptions(full_state_dict=True))
    net.requires_grad_(False)
    return net.eval()


class Distiller:
    """Frozen networks, student initialisation, loss and sampler of one stage."""

    def __init__(self, cfg: Config, teacher: DiT, stage1: DiT | None, weighting: nn.Module | None,
                 provenance: dict[str, dict[str, str]]):
        self.cfg, self.teacher, self.stage1 = cfg, teacher, stage1
        self.weighting, self.provenance = weighting, provenance
        self.stage = 1 if cfg.objective == "fmlm_stage1" else 2
        # Network passes per step relative to one student forward+backward (3 units):
        # stage 1: 2 teacher + 2 student forwards + 1 fwd/bwd; stage 2: D, g forwards + 1 fwd/bwd.
        self.cost = (4 + 3) / 3 if self.stage == 1 else (2 + 3) / 3

    @classmethod
    def build(cls, cfg: Config, mesh: DeviceMesh, device: torch.device) -> Distiller:
        """Load the frozen networks named in ``cfg.distill``; set ``cfg.model`` to the
        student's backbone (the teacher's, with a second time embedding)."""
        d = cfg.distill
        if not d.teacher:
            raise ValueError(f"objective={cfg.objective} needs distill.teacher (an FLM checkpoint)")
        if cfg.objective == "fmlm_stage2" and not d.stage1:
            raise ValueError("objective=fmlm_stage2 needs distill.stage1 (a stage-1 checkpoint)")
        teacher_cfg = model_config_of(d.teacher)
        if teacher_cfg.two_times:
            raise ValueError(f"distill.teacher={d.teacher} is a flow map, expected an FLM teacher")
        if (teacher_cfg.vocab_size, teacher_cfg.seq_len) != (cfg.model.vocab_size, cfg.model.seq_len):
            raise ValueError(f"distill.teacher has vocab_size={teacher_cfg.vocab_size}, "
                             f"seq_len={teacher_cfg.seq_len} but the config says model.vocab_size="
                             f"{cfg.model.vocab_size}, model.seq_len={cfg.model.seq_len}")
        cfg.model = dataclasses.replace(teacher_cfg, two_times=True, dropout=cfg.model.dropout)
        precision = cfg.dist.mixed_precision
        provenance = {"teacher": {"path": str(d.teacher), "fingerprint": ckpt.fingerprint(d.teacher)}}
        teacher = load_frozen(d.teacher, mesh, precision, device)
        stage1 = None
        if cfg.objective == "fmlm_stage2":
            s1_cfg = ckpt.read_config(d.stage1)
            if s1_cfg.get("objective") != "fmlm_stage1":
                raise ValueError(f"distill.stage1={d.stage1} was trained with objective="
                                 f"{s1_cfg.get('objective')!r}, expected fmlm_stage1")
            stage1 = load_frozen(d.stage1, mesh, precision, device)
            provenance["stage1"] = {"path": str(d.stage1), "fingerprint": ckpt.fingerprint(d.stage1)}
        weighting = None
        if d.weighting != "none":
            weighting = LossWeighting(d.weighting).to(device)
            fully_shard(weighting, mesh=mesh, mp_policy=mixed_precision("fp32"))
        log.info("distillation stage %s from %s", cfg.objective[-1], provenance)
        return cls(cfg, teacher, stage1, weighting, provenance)

    @torch.no_grad()
    def init_student(self, student: nn.Module) -> None:
        """theta <- teacher (EMA) weights; zero emb'(t)'s last layer and, in stage 1,
        the output layer, so the stage-1 map starts as the teacher's Euler step."""
        teacher = {clean_fqn(n): p for n, p in self.teacher.named_parameters()}
        zero = ["time_emb2.mlp.2."] + (["final.linear."] if self.stage == 1 else [])
        for name, p in student.named_parameters():
            name = clean_fqn(name)
            if any(name.startswith(z) for z in zero):
                p.zero_()
            elif name in teacher:
                local_tensor(p).copy_(local_tensor(teacher[name]))
            elif not name.startswith("time_emb2."):
                raise ValueError(f"student parameter {name} has no counterpart in the teacher")

    def loss(self, model: nn.Module, ids: torch.Tensor, num_global: int, index: torch.Tensor,
             shared: torch.Generator, gens: list[torch.Generator], tau):
        """(token-sum of the weighted loss, token-sum of the raw loss, per-example raw
        loss, interval length t - s).

        The flow-map losses are means over each example's tokens; multiplying the
        example sums by L makes the loop's division by the global token count give
        the mean over examples. The weighted loss (loss e^-w + w) is what is
        optimised; the raw squared error is what is reported. ``shared`` (same on
        every rank) draws the intervals of the global batch, ``gens`` (one per
        example) the noise.
        """
        d = self.cfg.distill
        boundary = d.boundary_prob
        s, t = sample_intervals(num_global, index, shared, boundary)
        student = _two_time(model)
        if self.stage == 1:
            loss_sum, _, stats = fmlm_stage1_loss(student, self.teacher, ids, s, t, tau, gens, self.weighting)
        else:
            loss_sum, _, stats = fmlm_stage2_loss(student, self.teacher, _two_time(self.stage1), ids, s, t, tau,
                                                  gens, self.weighting)
        length = ids.shape[1]
        return loss_sum * length, stats["raw_loss_sum"] * length, stats["raw_per_example"], t - s

    def sample(self, model: nn.Module, tau, num: int, steps: int, generator: torch.Generator,
               device: torch.device) -> torch.Tensor:
        shape = (num, self.cfg.model.seq_len, self.cfg.model.vocab_size)
        if self.stage == 1:
            ids, _ = sample_stage1(self.teacher, _two_time(model), tau, shape, steps, generator)
        else:
            ids, _ = sample_fmlm(_two_time(model), tau, shape, steps, generator)
        return ids

    @torch.no_grad()
    def weighting_curve(self, device: torch.device, points: int = 10) -> dict[str, float]:
        """w(s, t) on centred intervals of length d = k / points (TensorBoard figure)."""
        if self.weighting is None:
            return {}
        d = torch.arange(1, points + 1, device=device, dtype=torch.float32) / points
        w = self.weighting(0.5 - d / 2, 0.5 + d / 2)
        return {f"d{k:.1f}": v for k, v in zip(d.tolist(), w.float().tolist())}


def _two_time(model: nn.Module):
    """Call a two-time DiT as f(x, s, t) (its forward takes (x, t, t2))."""
    return lambda x, s, t: model(x, s, t)

