"""The FLM teacher (method.md section 1): denoising cross-entropy and its Euler sampler.

    x_g = (1 - g) eps + g e(x),  g = tau(t),  eps ~ N(0, I),  t ~ U[0, 1] stratified;
    loss = -sum_l log softmax(D(x_g, t))_l[x_l];
    sampling: x <- x + (tau(t_{i+1}) - tau(t_i)) (softmax D(x, t_i) - x) / (1 - tau(t_i)).

``flow.use_tau = False`` gives the ablation g = t.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from flm.config import Config, FlowConfig, from_dict
from flm.flow import Tau, get_tau, interpolate
from flm.methods.base import Batch, Fixed, LossOutput, no_options, stratified_times
from flm.rng import example_normal


def time_map(vocab_size: int, use_tau: bool) -> Tau:
    """tau for V tokens, or the identity (g = t) for the ablation."""
    return get_tau(vocab_size) if use_tau else Tau.identity()


def flm_loss(model: nn.Module, ids: torch.Tensor, t: torch.Tensor, tau: Tau,
             gens: list[torch.Generator], low_rank_noise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy denoising loss of the FLM teacher (method.md section 1).

    x_g = (1 - g) eps + g e(x), g = tau(t), eps ~ N(0, I);
    loss = -sum_l log softmax(D(x_g, t))_l[x_l].

    With ``low_rank_noise`` the model embeds x_g through the shortcut
    x_g W_in = (1 - g) z R + g W_in[x], z ~ N(0, I_d), R^T R = W_in^T W_in,
    never materialising the (B, L, V) noise; otherwise the dense state is built.
    Example b's noise comes from ``gens[b]`` (see :func:`flm.rng.example_normal`).
    Either way the model is asked for the loss (``targets=ids``), which it computes
    in chunks without holding the (B, L, V) logits (:mod:`flm.model.losses`).

    Returns (sum of token losses, per-example mean loss detached) -- the latter
    for the loss-by-t figures.
    """
    g = tau(t)
    if low_rank_noise:
        z = example_normal((ids.shape[1], model.tok_emb.embedding_dim), gens, ids.device)
        loss = model(ids, t, g=g, noise=z, targets=ids)
    else:
        eps = example_normal((ids.shape[1], model.tok_emb.num_embeddings), gens, ids.device)
        loss = model(interpolate(ids, eps, g), t, targets=ids)
    return loss.sum, loss.per_token.mean(1)


@torch.no_grad()
def euler_sample(model: nn.Module, tau: Tau, batch: int, seq_len: int, vocab_size: int,
                 steps: int, generator: torch.Generator, device: torch.device, fixed: Fixed | None = None
                 ) -> torch.Tensor:
    """Integrate the FLM ODE from noise (t = 0) to data (t = 1) on t_i = i / N.

    x <- eps; for i < N - 1: p = softmax(D(x, t_i)),
    x <- x + (tau(t_{i+1}) - tau(t_i)) (p - x) / (1 - tau(t_i));
    at the last step return argmax p. Returns token ids (batch, seq_len).
    With ``fixed``, the known positions are set to a draw of their clean path,
    (1 - g_i) eps_i + g_i e(x) with fresh eps_i, before every network call, and returned
    unchanged. This replacement is approximate for a deterministic flow: the free
    positions commit early, partly on their own noise (see tests/test_conditioning.py
    for the measured effect on a toy with the exact denoiser).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = torch.randn(batch, seq_len, vocab_size, generator=generator, device=device)
    grid = torch.linspace(0, 1, steps + 1, dtype=torch.float64, device=device)
    g_grid = tau(grid).double()
    for i in range(steps):
        t = grid[i].float().expand(batch)
        if fixed is not None and i > 0:  # at t_0 = 0 the clean path is the initial noise itself
            x = fixed.hold(x, torch.randn(x.shape, generator=generator, device=device), g_grid[i].float())
        p = torch.softmax(model(x, t).float(), dim=-1)
        if i == steps - 1:
            return p.argmax(-1) if fixed is None else fixed.apply(p.argmax(-1))
        g, g_next = g_grid[i], g_grid[i + 1]
        x = x + ((g_next - g) / (1 - g)).float() * (p - x)
    raise AssertionError("unreachable")


class FLM:
    """The flow language model teacher D(x_g, t)."""

    name: ClassVar[str] = "flm"
    bucket_label: ClassVar[str] = "loss_by_t/t"
    weighted: ClassVar[bool] = False
    any_steps: ClassVar[bool] = True

    def __init__(self, flow: FlowConfig, seq_len: int, vocab_size: int) -> None:
        self.flow, self.seq_len, self.vocab_size = flow, seq_len, vocab_size
        self.tau = time_map(vocab_size, flow.use_tau)
        self.cost = 1.0
        self.dense_input = not flow.low_rank_noise
        self.provenance: dict[str, dict[str, str]] = {}
        self.extra_modules: dict[str, nn.Module] = {}

    @classmethod
    def build(cls, cfg: Config, mesh: Any, device: torch.device) -> FLM:
        cfg.model.two_times, cfg.model.causal, cfg.model.extra_input_ids = False, False, 0
        return cls(cfg.flow, cfg.model.seq_len, cfg.model.vocab_size)

    @classmethod
    def for_generation(cls, config: dict, device: torch.device, **options: Any) -> FLM:
        no_options(cls.name, options)
        model = config["model"]
        return cls(from_dict(FlowConfig, config.get("flow", {})), int(model["seq_len"]), int(model["vocab_size"]))

    def init_model(self, model: nn.Module) -> None:
        pass

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        t = stratified_times(batch.num_global, batch.index, batch.shared)
        loss_sum, per_example = flm_loss(model, batch.ids, t, self.tau, batch.gens, self.flow.low_rank_noise)
        return LossOutput(loss_sum, loss_sum, per_example, t)

    def sample(self, model: nn.Module, num: int, steps: int, generator: torch.Generator,
               fixed: Fixed | None = None) -> tuple[torch.Tensor, int]:
        ids = euler_sample(model, self.tau, num, self.seq_len, self.vocab_size, steps, generator, generator.device,
                           fixed)
        return ids, steps

    def scalars(self, device: torch.device) -> dict[str, float]:
        return {}
