"""Sampling: the FLM teacher's Euler sampler (method.md section 1) and loading
any trained model kind for generation.

Few-step samplers for flow maps live in :mod:`flm.flow_map`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flm import checkpoint as ckpt
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


@dataclass
class Sampler:
    """A trained model of any kind, ready to generate on one process.

    ``kind`` is the run's objective: "flm" (Euler over the teacher ODE, one
    network per step), "fmlm_stage1" (teacher + residual map, two networks per
    step) or "fmlm_stage2" (the FMLM, one network per step).
    """

    kind: str
    config: dict
    nets: dict[str, nn.Module]
    tau: Tau
    device: torch.device

    @property
    def seq_len(self) -> int:
        return int(self.config["model"]["seq_len"])

    @property
    def vocab_size(self) -> int:
        return int(self.config["model"]["vocab_size"])

    @torch.no_grad()
    def generate(self, num: int, steps: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """Token ids (num, L) from ``steps`` steps, and the number of network evaluations."""
        from flm.flow_map import sample_fmlm, sample_stage1

        shape = (num, self.seq_len, self.vocab_size)
        if self.kind == "flm":
            ids = euler_sample(self.nets["model"], self.tau, num, self.seq_len, self.vocab_size, steps,
                               generator, self.device)
            return ids, steps
        if self.kind == "fmlm_stage1":
            return sample_stage1(self.nets["teacher"], self.nets["model"], self.tau, shape, steps, generator)
        return sample_fmlm(self.nets["model"], self.tau, shape, steps, generator)


def load_sampler(path: str | Path, device: torch.device | str = "cpu", teacher: str | None = None) -> Sampler:
    """Load a checkpoint directory (its EMA weights) or an exported file for sampling.

    A stage-1 map also needs its FLM teacher: the one recorded in its config,
    or ``teacher`` to point at a moved copy.
    """
    from flm.config import ModelConfig, from_dict
    from flm.distill import load_frozen
    from flm.flow import get_tau

    device = torch.device(device)
    config = ckpt.read_config(path)
    kind = config.get("objective", "flm")
    if kind not in ("flm", "fmlm_stage1", "fmlm_stage2"):
        raise ValueError(f"{path}: unknown model kind (objective) {kind!r}")
    nets = {"model": load_frozen(path, None, "fp32", device)}
    if kind == "fmlm_stage1":
        teacher = teacher or config["distill"]["teacher"]
        nets["teacher"] = load_frozen(teacher, None, "fp32", device)
    mcfg = from_dict(ModelConfig, config["model"])
    tau = get_tau(mcfg.vocab_size) if config.get("flow", {}).get("use_tau", True) else Tau.identity()
    return Sampler(kind, config, nets, tau, device)
