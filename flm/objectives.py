"""Training objectives as pure functions of (models, batch, generators).

The FLM teacher loss lives here; the flow-map distillation losses live in
:mod:`flm.flow_map`. Each returns a *sum* over tokens so that the training
loop can divide by the global token count of the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flm.flow import Tau, interpolate


def stratified_times(num_global: int, indices: torch.Tensor, shared_gen: torch.Generator) -> torch.Tensor:
    """t_i = (i + u) / N for global example indices i, with one u ~ U[0, 1).

    ``shared_gen`` must be seeded identically on every rank (by seed and step)
    so that the N times of a step cover [0, 1) evenly across the *global*
    batch; each rank passes the global indices of its own examples.
    """
    u = torch.rand((), generator=shared_gen, dtype=torch.float64)
    return ((indices.double() + u) / num_global).float()


def flm_loss(model: nn.Module, ids: torch.Tensor, t: torch.Tensor, tau: Tau,
             generator: torch.Generator, low_rank_noise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy denoising loss of the FLM teacher (method.md section 1).

    x_g = (1 - g) eps + g e(x), g = tau(t), eps ~ N(0, I);
    loss = -sum_l log softmax(D(x_g, t))_l[x_l].

    With ``low_rank_noise`` the model embeds x_g through the shortcut
    x_g W_in = (1 - g) z R + g W_in[x], z ~ N(0, I_d), R^T R = W_in^T W_in,
    never materialising the (B, L, V) noise; otherwise the dense state is built.

    Returns (sum of token losses, per-example mean loss detached) -- the latter
    for the loss-by-t figures.
    """
    g = tau(t)
    if low_rank_noise:
        logits = model(ids, t, g=g, generator=generator)
    else:
        vocab = model.tok_emb.num_embeddings
        eps = torch.randn(*ids.shape, vocab, generator=generator, device=ids.device)
        logits = model(interpolate(ids, eps, g), t)
    ce = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="none").view(ids.shape)
    return ce.sum(), ce.detach().mean(1)


def loss_by_bucket(t: torch.Tensor, per_example: torch.Tensor, buckets: int = 10) -> torch.Tensor:
    """(2, buckets) tensor of per-bucket loss sums and counts over t in [0, 1)."""
    idx = (t.clamp(0, 1 - 1e-6) * buckets).long()
    out = torch.zeros(2, buckets, dtype=torch.float64, device=t.device)
    out[0].index_add_(0, idx, per_example.double())
    out[1].index_add_(0, idx, torch.ones_like(per_example, dtype=torch.float64))
    return out
