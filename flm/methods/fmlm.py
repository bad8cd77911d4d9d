"""FMLM: online teacher-to-student flow-map distillation (method.md section 2).

Two methods share this file, one per stage:

* ``fmlm_stage1``: a residual flow map X_{s,t}(x) = x + Delta v(x, s) + 1/2 Delta^2 g(x, s, t)
  with the frozen FLM teacher D inside v, trained on the semigroup target;
* ``fmlm_stage2``: the one-network FMLM X^h_{s,t}(x) = x + Delta (softmax h(x, s, t) - x) / (1 - G_s),
  trained to match the frozen stage-1 map.

The frozen networks (EMA weights of their checkpoints) run inside every step,
either as full bf16 copies on every rank (``distill.frozen_placement="replicated"``,
no communication) or sharded with FSDP2 like the student (``"sharded"``: less
memory, an all-gather of every block on each of their forwards); their paths and
fingerprints are the run's provenance (a resume with other teachers is refused).
The maths is in :mod:`flm.flow_map`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from flm.config import Config, from_dict, FlowConfig, ModelConfig
from flm.distributed import clean_fqn, local_tensor, mixed_precision
from flm.flow_map import (LossWeighting, fmlm_stage1_loss, fmlm_stage2_loss, sample_fmlm, sample_intervals,
                          sample_stage1)
from flm.loading import FrozenLoader, cast_frozen, load_frozen
from flm.methods.base import Batch, Fixed, LossOutput, no_options
from flm.methods.flm import time_map

log = logging.getLogger("flm")


@torch.no_grad()
def init_student(student: nn.Module, teacher: nn.Module, zero_output: bool) -> None:
    """theta <- teacher (EMA) weights; zero emb'(t)'s last layer and, with ``zero_output``
    (stage 1), the output layer, so the stage-1 map starts as the teacher's Euler step
    (g = 0) and the stage-2 map as the teacher's one-step denoiser (h = D).

    Works on plain and on FSDP2-sharded models alike: a teacher sharded like the
    student gives each rank its own shards, a full (replicated) teacher is sliced
    to the student's shard on each rank without communication.
    """
    source = {clean_fqn(n): p for n, p in teacher.named_parameters()}
    zero = ["time_emb2.mlp.2."] + (["final.linear."] if zero_output else [])
    for name, p in student.named_parameters():
        name = clean_fqn(name)
        if any(name.startswith(z) for z in zero):
            p.zero_()
        elif name in source:
            src = source[name]
            if isinstance(p, DTensor) and not isinstance(src, DTensor):
                src = distribute_tensor(src.detach(), p.device_mesh, p.placements, src_data_rank=None)
            local_tensor(p).copy_(local_tensor(src))
        elif not name.startswith("time_emb2."):
            raise ValueError(f"student parameter {name} has no counterpart in the teacher")
    unused = sorted(set(source) - {clean_fqn(n) for n, _ in student.named_parameters()})
    if unused:
        raise ValueError(f"teacher parameters {unused[:5]} have no counterpart in the student")


class _FlowMap:
    """What both stages share: frozen networks, weighting, provenance, the student's backbone."""

    name: ClassVar[str]
    stage: ClassVar[int]
    bucket_label: ClassVar[str] = "loss_by_interval/d"  # t - s
    any_steps: ClassVar[bool] = True

    def __init__(self, cfg_flow: FlowConfig, seq_len: int, vocab_size: int, teacher: nn.Module | None,
                 stage1: nn.Module | None, weighting: nn.Module | None, boundary_prob: int,
                 provenance: dict[str, dict[str, str]], target_dropout: bool = True,
                 frozen_dtype: torch.dtype | None = None, compute_dtype: torch.dtype | None = None) -> None:
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.tau = time_map(vocab_size, cfg_flow.use_tau)
        self.teacher, self.stage1, self.weighting = teacher, stage1, weighting
        self.boundary_prob, self.provenance, self.target_dropout = boundary_prob, provenance, target_dropout
        self.frozen_dtype = frozen_dtype  # replicated frozen nets are cast to it after init_model
        self.compute_dtype = compute_dtype  # the networks' input dtype: dense states are cast once to it
        self.weighted = weighting is not None
        self.extra_modules = {"weighting": weighting} if weighting is not None else {}
        self.dense_input = True

    @classmethod
    def build(cls, cfg: Config, mesh: Any, device: torch.device,
              frozen_loader: FrozenLoader | None = None) -> _FlowMap:
        """Load the frozen networks named in ``cfg.distill``; set ``cfg.model`` to the
        student's backbone (the teacher's, with a second time embedding).

        ``frozen_loader`` reads their configs, fingerprints and weights (default: from
        the checkpoints; :mod:`flm.memplan` builds them on fake tensors instead)."""
        loader = frozen_loader or FrozenLoader()
        d = cfg.distill
        if not d.teacher:
            raise ValueError(f"objective={cfg.objective} needs distill.teacher (an FLM checkpoint)")
        if cls.stage == 2 and not d.stage1:
            raise ValueError("objective=fmlm_stage2 needs distill.stage1 (a stage-1 checkpoint)")
        teacher_config = loader.config(d.teacher)
        teacher_cfg = from_dict(ModelConfig, teacher_config["model"])
        teacher_kind = teacher_config.get("objective", "flm")
        if teacher_cfg.two_times or teacher_kind != "flm":
            raise ValueError(f"distill.teacher={d.teacher} was trained with objective={teacher_kind!r}; "
                             "expected an FLM teacher (objective=flm)")
        if (teacher_cfg.vocab_size, teacher_cfg.seq_len) != (cfg.model.vocab_size, cfg.model.seq_len):
            raise ValueError(f"distill.teacher has vocab_size={teacher_cfg.vocab_size}, "
                             f"seq_len={teacher_cfg.seq_len} but the config says model.vocab_size="
                             f"{cfg.model.vocab_size}, model.seq_len={cfg.model.seq_len}")
        cfg.model = dataclasses.replace(teacher_cfg, two_times=True, dropout=cfg.model.dropout)
        precision, placement = cfg.dist.mixed_precision, d.frozen_placement
        provenance = {"teacher": {"path": str(d.teacher), "fingerprint": loader.fingerprint(d.teacher)}}
        teacher = loader.load(d.teacher, mesh, precision, device, placement)
        stage1 = None
        if cls.stage == 2:
            s1_kind = loader.config(d.stage1).get("objective")
            if s1_kind != "fmlm_stage1":
                raise ValueError(f"distill.stage1={d.stage1} was trained with objective={s1_kind!r}, "
                                 "expected fmlm_stage1")
            stage1 = loader.load(d.stage1, mesh, precision, device, placement)
            provenance["stage1"] = {"path": str(d.stage1), "fingerprint": loader.fingerprint(d.stage1)}
        weighting = None
        if d.weighting != "none":
            weighting = LossWeighting(d.weighting)
            if weighting.freqs.device != device:  # (fake tensors of flm.memplan cannot take a no-op .to)
                weighting = weighting.to(device)
            fully_shard(weighting, mesh=mesh, mp_policy=mixed_precision("fp32"))
        log.info("distillation stage %d from %s (frozen networks %s)", cls.stage, provenance, placement)
        frozen_dtype = torch.bfloat16 if placement == "replicated" and precision == "bf16" else None
        return cls(cfg.flow, cfg.model.seq_len, cfg.model.vocab_size, teacher, stage1, weighting,
                   d.boundary_prob, provenance, d.target_dropout, frozen_dtype,
                   torch.bfloat16 if precision == "bf16" else None)

    def init_model(self, model: nn.Module) -> None:
        """Student <- teacher (fp32 weights); then replicated frozen nets drop to the compute
        dtype (bf16: the same weights FSDP's mixed precision would gather, half the memory)."""
        init_student(model, self.teacher, zero_output=self.stage == 1)
        if self.frozen_dtype is not None:
            for net in (self.teacher, self.stage1):
                if net is not None:
                    cast_frozen(net, self.frozen_dtype)

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Weighted loss (optimised) and raw squared error (reported), bucketed by t - s.

        The flow-map losses are means over each example's tokens; multiplying the
        example sums by L makes the loop's division by the global token count give
        the mean over examples. ``batch.shared`` draws the intervals of the global
        batch, ``batch.gens`` the noise.
        """
        s, t = sample_intervals(batch.num_global, batch.index, batch.shared, self.boundary_prob)
        if self.stage == 1:  # a two-time DiT is called as g(x, s, t)
            loss_sum, _, stats = fmlm_stage1_loss(model, self.teacher, batch.ids, s, t, self.tau, batch.gens,
                                                  self.weighting, target_dropout=self.target_dropout,
                                                  compute_dtype=self.compute_dtype)
        else:
            loss_sum, _, stats = fmlm_stage2_loss(model, self.teacher, self.stage1, batch.ids, s, t,
                                                  self.tau, batch.gens, self.weighting,
                                                  compute_dtype=self.compute_dtype)
        length = batch.ids.shape[1]
        return LossOutput(loss_sum * length, stats["raw_loss_sum"] * length, stats["raw_per_example"], t - s)

    @torch.no_grad()
    def scalars(self, device: torch.device, points: int = 10) -> dict[str, float]:
        """w on centred intervals of length d = k / points ("weighting/w_centred_d0.1", ...)."""
        if self.weighting is None:
            return {}
        d = torch.arange(1, points + 1, device=device, dtype=torch.float32) / points
        w = self.weighting(0.5 - d / 2, 0.5 + d / 2)
        return {f"weighting/w_centred_d{k:.1f}": v for k, v in zip(d.tolist(), w.float().tolist())}


class FMLMStage1(_FlowMap):
    """Stage 1: the residual map g_theta beside the frozen teacher (two networks per step)."""

    name: ClassVar[str] = "fmlm_stage1"
    stage: ClassVar[int] = 1
    # 2 teacher + 2 no-grad student forwards (1 unit each) + 1 student forward/backward (3 units)
    cost = (4 + 3) / 3

    @classmethod
    def for_generation(cls, config: dict, device: torch.device, **options: Any) -> FMLMStage1:
        """Sampling needs the FLM teacher recorded in ``config`` (see :func:`flm.sampling.load_sampler`)."""
        no_options(cls.name, options)
        net = load_frozen(config["distill"]["teacher"], None, "fp32", device)
        return cls(from_dict(FlowConfig, config.get("flow", {})), int(config["model"]["seq_len"]),
                   int(config["model"]["vocab_size"]), net, None, None, 0, {})

    def sample(self, model: nn.Module, num: int, steps: int, generator: torch.Generator,
               fixed: Fixed | None = None) -> tuple[torch.Tensor, int]:
        shape = (num, self.seq_len, self.vocab_size)
        return sample_stage1(self.teacher, model, self.tau, shape, steps, generator, fixed)


class FMLMStage2(_FlowMap):
    """Stage 2: the one-network FMLM h_theta (what users sample from)."""

    name: ClassVar[str] = "fmlm_stage2"
    stage: ClassVar[int] = 2
    # D and g forwards (1 unit each) + 1 student forward/backward (3 units)
    cost = (2 + 3) / 3

    @classmethod
    def for_generation(cls, config: dict, device: torch.device, **options: Any) -> FMLMStage2:
        no_options(cls.name, options)
        return cls(from_dict(FlowConfig, config.get("flow", {})), int(config["model"]["seq_len"]),
                   int(config["model"]["vocab_size"]), None, None, None, 0, {})

    def sample(self, model: nn.Module, num: int, steps: int, generator: torch.Generator,
               fixed: Fixed | None = None) -> tuple[torch.Tensor, int]:
        shape = (num, self.seq_len, self.vocab_size)
        return sample_fmlm(model, self.tau, shape, steps, generator, fixed)
