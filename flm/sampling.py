"""The FLM teacher's Euler sampler (method.md section 1).

Few-step samplers for flow maps live in :mod:`flm.flow_map`.
"""

from __future__ import annotations

import torch
from torch import nn

from flm.flow import Tau


@torch.no_grad()
def euler_sample(model: nn.Module, tau: Tau, batch: int, seq_len: int, vocab_size: int,
                 steps: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Integrate the FLM ODE from noise (t = 0) to data (t = 1) on t_i = i / N.

    x <- eps; for i < N - 1: p = softmax(D(x, t_i)),
    x <- x + (tau(t_{i+1}) - tau(t_i)) (p - x) / (1 - tau(t_i));
    at the last step return argmax p. Returns token ids (batch, seq_len).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = torch.randn(batch, seq_len, vocab_size, generator=generator, device=device)
    grid = torch.linspace(0, 1, steps + 1, dtype=torch.float64, device=device)
    g_grid = tau(grid).double()
    for i in range(steps):
        t = grid[i].float().expand(batch)
        p = torch.softmax(model(x, t).float(), dim=-1)
        if i == steps - 1:
            return p.argmax(-1)
        g, g_next = g_grid[i], g_grid[i + 1]
        x = x + ((g_next - g) / (1 - g)).float() * (p - x)
    raise AssertionError("unreachable")
