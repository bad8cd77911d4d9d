"""Training objectives as pure functions of (models, batch, generators).

The FLM teacher loss lives here; the flow-map distillation losses live in
:mod:`flm.flow_map`. Each returns a *sum* over tokens so that the training
loop can divide by the global token count of the step.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from flm.flow import Tau, interpolate


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (seed, step, rank, example, stream).

    Deterministic across processes and Python versions, and distinct for
    distinct parts (unlike ``hash`` of a tuple, where hash(-1) == hash(-2)).
    """
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def stratified_times(num_global: int, indices: torch.Tensor, shared_gen: torch.Generator) -> torch.Tensor:
    """t_i = (i + u) / N for global example indices i, with one u ~ U[0, 1).

    ``shared_gen`` must be seeded identically on every rank (by seed and step)
    so that the N times of a step cover [0, 1) evenly across the *global*
    batch; each rank passes the global indices of its own examples.
    """
    u = torch.rand((), generator=shared_gen, dtype=torch.float64, device=shared_gen.device)
    return ((indices.to(u.device).double() + u) / num_global).float()


def example_generators(seed: int, step: int, indices: torch.Tensor | range, device: torch.device,
                       stream: int = 0) -> list[torch.Generator]:
    """One generator per example, seeded by (seed, step, global example index).

    Noise drawn from these does not depend on how the global batch is split
    over ranks, so a run resumed on another number of processes sees the same
    noise for the same example.
    """
    gens = []
    for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices):
        g = torch.Generator(device=device)
        g.manual_seed(derive_seed(seed, step, i, stream))
        gens.append(g)
    return gens


def example_normal(shape: tuple[int, ...], gens: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """Standard normal (len(gens), *shape), example b drawn from ``gens[b]``."""
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])


def flm_loss(model: nn.Module, ids: torch.Tensor, t: torch.Tensor, tau: Tau,
             gens: list[torch.Generator], low_rank_noise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy denoising loss of the FLM teacher (method.md section 1).

    x_g = (1 - g) eps + g e(x), g = tau(t), eps ~ N(0, I);
    loss = -sum_l log softmax(D(x_g, t))_l[x_l].

    With ``low_rank_noise`` the model embeds x_g through the shortcut
    x_g W_in = (1 - g) z R + g W_in[x], z ~ N(0, I_d), R^T R = W_in^T W_in,
    never materialising the (B, L, V) noise; otherwise the dense state is built.
    Example b's noise comes from ``gens[b]`` (see :func:`example_generators`).

    Returns (sum of token losses, per-example mean loss detached) -- the latter
    for the loss-by-t figures.
    """
    g = tau(t)
    if low_rank_noise:
        z = example_normal((ids.shape[1], model.tok_emb.embedding_dim), gens, ids.device)
        logits = model(ids, t, g=g, noise=z)
    else:
        eps = example_normal((ids.shape[1], model.tok_emb.num_embeddings), gens, ids.device)
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
