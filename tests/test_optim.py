import math

import pytest
import torch

from flm.config import OptimConfig
from flm.optim import EMA, build_optimizer, build_scheduler, clip_grad_norm, lr_factor


def test_warmup_then_constant_or_cosine():
    cfg = OptimConfig(warmup_steps=10, schedule="constant")
    assert lr_factor(0, cfg, 100) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 100) == 1.0 and lr_factor(99, cfg, 100) == 1.0
    cos = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(10, cos, 110) == pytest.approx(1.0)
    assert lr_factor(60, cos, 110) == pytest.approx(0.55)
    assert lr_factor(110, cos, 110) == pytest.approx(0.1)


def test_scheduler_state_round_trip():
    p = torch.nn.Parameter(torch.zeros(3))
    cfg = OptimConfig(lr=1.0, warmup_steps=4)
    opt = build_optimizer([p], cfg)
    sched = build_scheduler(opt, cfg, 10)
    for _ in range(3):
        opt.step()
        sched.step()
    opt2 = build_optimizer([p], cfg)
    sched2 = build_scheduler(opt2, cfg, 10)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr() == [1.0]


def test_clip_grad_norm_reports_and_clips():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)  # norm 6
    norm = float(clip_grad_norm([p], 1.0))
    assert norm == pytest.approx(6.0)
    assert p.grad.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_ema_tracks_and_swaps():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()  # warm-up decay min(0.5, 2/11) = 2/11
    d = 2 / 11
    for n, p in model.named_parameters():
        assert torch.allclose(ema.shadow[n], d * start[n] + (1 - d) * p.detach())
    current = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.averaged(model):
        assert all(torch.equal(p, ema.shadow[n]) for n, p in model.named_parameters())
    assert all(torch.equal(p, current[n]) for n, p in model.named_parameters())
    restored = EMA(model, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1 and all(torch.equal(restored.shadow[n], ema.shadow[n]) for n in ema.shadow)
    assert not math.isnan(sum(v.sum().item() for v in ema.shadow.values()))
