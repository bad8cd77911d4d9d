"""AdamW, the learning-rate schedule, gradient clipping and the weight EMA.

All of them work on FSDP2's sharded parameters (DTensors): each rank updates
its own shard, and only the gradient norm needs a collective.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from flm.config import OptimConfig
from flm.distributed import clean_fqn, local_tensor


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=True)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then constant or cosine to ``min_lr_ratio``.

    ``step`` counts completed optimizer steps, so the first update uses
    ``lr * 1 / warmup_steps``.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps))


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip by the global gradient norm across all shards; returns the norm before
    clipping as a 0-d tensor on the parameters' device (no host sync)."""
    with_grad = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad], foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()  # sum of squares over the shards of every rank
    if max_norm > 0:  # takes parameters and scales their .grad
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, norm, foreach=True)
    return norm


class EMA:
    """Exponential moving average of the weights, theta_ema <- d theta_ema + (1-d) theta.

    Shadows are fp32 copies with the parameters' own sharding, so every rank
    keeps only its shard and DCP saves/reshards them like the model. The decay
    is warmed up as min(decay, (1 + n) / (10 + n)) so that early shadows are
    not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = {clean_fqn(n): p for n, p in model.named_parameters()}
        self.shadow = {n: p.detach().clone().float() for n, p in self.params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        shadow = [local_tensor(self.shadow[n]) for n in self.params]
        current = [local_tensor(p).float() for p in self.params.values()]
        torch._foreach_lerp_(shadow, current, 1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, "_updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.updates = int(state["_updates"])
        for n, t in self.shadow.items():
            local_tensor(t).copy_(local_tensor(state[n]))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (same sharding)."""
        for n, p in model.named_parameters():
            local_tensor(p).copy_(local_tensor(self.shadow[clean_fqn(n)]))


    @contextmanager
    def averaged(self, model: nn.Module):
        """Temporarily swap the averaged weights into ``model`` (for sampling)."""
        backup = [local_tensor(p).detach().clone() for p in model.parameters()]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(model.parameters(), backup):
                    local_tensor(p).copy_(b)

