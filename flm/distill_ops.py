"""In-place dense states for the FMLM distillation losses (:mod:`flm.flow_map`).

A distillation step handles dense (B, L, V) tensors; at L = 1024 and V = 50257 each
float32 one is 200 MB per example, so each extra copy counts:

* :func:`noisy_state` builds x_s = (1 - G_s) eps + G_s e(x) in one buffer: the noise is
  drawn in place per example and the clean tokens are added by a scatter, with no
  one-hot and no stack;
* :func:`softmax_` turns float32 logits into probabilities in their own buffer.

The squared errors themselves are :func:`flm.model.losses.linear_map_error`; the whole
losses are checked against the plain-autograd ones kept in ``tools/distill_reference.py``
(tests/test_distill_memory.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flm.rng import example_normal


def noisy_state(ids: torch.Tensor, G_s: torch.Tensor, vocab_size: int,
                generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
    """x_s = (1 - G_s) eps + G_s e(x), float32 (B, L, V), built in one buffer.

    eps ~ N(0, I) comes from one generator, or example b's from ``generator[b]`` (then
    exactly the values ``torch.randn((L, V), generator=generator[b])`` gives, so the noise
    does not depend on how the global batch is split over ranks). ``G_s``: (B,).
    """
    shape = (ids.shape[1], vocab_size)
    if isinstance(generator, torch.Generator):
        x = torch.randn(ids.shape[0], *shape, generator=generator, device=generator.device)
    else:
        x = example_normal(shape, list(generator), generator[0].device)
    x = x.to(ids.device)
    g = G_s.to(device=x.device, dtype=torch.float32)
    x.mul_((1.0 - g)[:, None, None])
    return x.scatter_add_(-1, ids[..., None], g[:, None, None].expand(*ids.shape, 1).contiguous())


def softmax_(logits: torch.Tensor) -> torch.Tensor:
    """softmax over V in float32; float32 logits are overwritten (no second buffer)."""
    x = logits if logits.dtype == torch.float32 else logits.float()
    x.sub_(x.amax(dim=-1, keepdim=True)).exp_()
    return x.div_(x.sum(dim=-1, keepdim=True))
