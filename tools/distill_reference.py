"""The FMLM distillation losses as they were before the memory work of issue 10.

Plain autograd with every (B, L, V) intermediate materialised in float32: a per-example
list of noise tensors and its stack, an int64 one-hot of the clean tokens and its float
copy, the predicted and target maps, their difference and its square. Kept, unchanged, as
the baseline of ``python tools/bench.py distill_step`` (peak memory and tokens/s) and as
the float32 reference that tests/test_distill_memory.py checks the lean losses of
:mod:`flm.flow_map` against. Not used by training.
"""

from __future__ import annotations

import torch

from flm.flow import interpolate
from flm.flow_map import (Generators, LossWeighting, Model, TimeMap, _G, _bcast, _eval_mode, _one_minus,
                          _probs, _reduce, _residual_clean, flow_step, stage1_clean)
from torch import nn


def _noisy_state(x1_ids: torch.Tensor, G_s: torch.Tensor, teacher: Model, generator: Generators) -> torch.Tensor:
    """x_s = (1 - G_s) eps + G_s e(x1), dense eps ~ N(0, I) of shape (B, L, V), float32.

    V is the teacher's vocabulary, ``teacher.tok_emb.num_embeddings``. eps comes from one
    generator, or example b's from ``generator[b]`` (per-example generators make the
    noise independent of how the global batch is split over ranks).
    """
    shape = (x1_ids.shape[1], teacher.tok_emb.num_embeddings)
    if isinstance(generator, torch.Generator):
        eps = torch.randn(x1_ids.shape[0], *shape, generator=generator, device=generator.device)
    else:
        eps = torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generator])
    return interpolate(x1_ids, eps.to(x1_ids.device), G_s.float())



@torch.no_grad()
def _two_half_steps(student: Model, teacher: Model, x_s: torch.Tensor, p_s: torch.Tensor, s: torch.Tensor,
                    t: torch.Tensor, tau: TimeMap) -> torch.Tensor:
    """The stage-1 target c* (see :func:`fmlm_stage1_loss`); its intermediates die on return."""
    u = s + 0.5 * (t - s)
    G_s, G_u, G_t = _G(tau, s), _G(tau, u), _G(tau, t)
    c_su = _residual_clean(p_s, student(x_s, s, u), G_s, G_u)
    y_u = flow_step(x_s, c_su, G_s, G_u)
    c_ut = _residual_clean(_probs(teacher(y_u, u)), student(y_u, u, t), G_u, G_t)
    delta = G_t - G_s
    w1 = torch.where(delta > 0, (G_u - G_s) / delta.clamp_min(1e-300), 0.5)
    w2 = torch.where(delta > 0, (G_t - G_u) / delta.clamp_min(1e-300), 0.5)
    k = _one_minus(G_s) / _one_minus(G_u)
    return x_s + _bcast(w1) * (c_su - x_s) + _bcast(w2 * k) * (c_ut - y_u)



def fmlm_stage1_loss(student: Model, teacher: Model, x1_ids: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                     tau: TimeMap, generator: Generators, weighting: LossWeighting | None = None,
                     target_dropout: bool = True) -> tuple[torch.Tensor, torch.Tensor, Stats]:
    """Stage-1 loss as flm.flow_map.fmlm_stage1_loss computed it before the memory work."""
    G_s, G_t = _G(tau, s), _G(tau, t)
    x_s = _noisy_state(x1_ids, G_s, teacher, generator)
    with torch.no_grad():
        p_s = _probs(teacher(x_s, s))
    if target_dropout:
        target = _two_half_steps(student, teacher, x_s, p_s, s, t, tau)
    else:
        if not isinstance(student, nn.Module):
            raise TypeError("target_dropout=False needs the student nn.Module (to switch it to eval mode), "
                            f"got {type(student).__name__}")
        with _eval_mode(student):
            target = _two_half_steps(student, teacher, x_s, p_s, s, t, tau)
    pred = _residual_clean(p_s, student(x_s, s, t), G_s, G_t)
    return _reduce((target - pred).square().sum(-1), s, t, weighting)



def fmlm_stage2_loss(student_h: Model, teacher: Model, stage1_g: Model, x1_ids: torch.Tensor, s: torch.Tensor,
                     t: torch.Tensor, tau: TimeMap, generator: Generators,
                     weighting: LossWeighting | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, Stats]:
    """Stage-2 loss as flm.flow_map.fmlm_stage2_loss computed it before the memory work."""
    G_s, G_t = _G(tau, s), _G(tau, t)
    x_s = _noisy_state(x1_ids, G_s, teacher, generator)
    with torch.no_grad():
        target_clean = stage1_clean(teacher(x_s, s), stage1_g(x_s, s, t), G_s, G_t)
    r = ((G_t - G_s) / _one_minus(G_s)).clamp(0.0, 1.0)
    err = _bcast(r) * (target_clean - _probs(student_h(x_s, s, t)))
    return _reduce(err.square().sum(-1), s, t, weighting)
