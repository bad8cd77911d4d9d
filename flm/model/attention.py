"""Bidirectional multi-head attention with one backend per process and device type.

    out_h = softmax(Q_h K_h^T / sqrt(Dh)) V_h        for every head h, no mask,

with tensors laid out (B, L, H, Dh) in and out. On CUDA the backend is xformers'
``memory_efficient_attention`` when its kernels load (probed once with a tiny call);
everywhere else, or when the probe fails, it is torch's ``scaled_dot_product_attention``.
Both use the scale 1/sqrt(Dh). Dropout on the attention probabilities is applied
with probability ``dropout_p``; callers pass 0 outside training.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("flm")

# device type ("cuda", "cpu", ...) -> backend name; filled once per process.
_BACKENDS: dict[str, str] = {}


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, causal: bool = False) -> torch.Tensor:
    """torch SDPA expects (B, H, L, Dh): transpose in and out."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, is_causal=causal
    )
    return out.transpose(1, 2)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, causal: bool = False
              ) -> torch.Tensor:
    """xformers' native layout is (B, L, H, Dh) ("BMHK"); default scale 1/sqrt(Dh)."""
    from xformers.ops import LowerTriangularMask, memory_efficient_attention

    return memory_efficient_attention(q, k, v, p=dropout_p, attn_bias=LowerTriangularMask() if causal else None)


def _xformers_kernels_load() -> bool:
    """One tiny bf16 call on the current CUDA device; any failure means "no"."""
    try:
        x = torch.randn(1, 4, 2, 64, device="cuda", dtype=torch.bfloat16)
        out = _xformers(x, x, x, 0.0)
        torch.cuda.synchronize()
        return bool(torch.isfinite(out).all())
    except Exception as exc:  # ImportError, missing kernels, unsupported GPU, ...
        log.debug("xformers probe failed: %r", exc)
        return False


@torch.compiler.disable
def _choose_backend(device_type: str) -> str:
    name = "xformers" if device_type == "cuda" and _xformers_kernels_load() else "sdpa"
    log.info("attention backend on %s: %s", device_type, name)
    _BACKENDS[device_type] = name
    return name


def attention_backend(device: torch.device | str) -> str:
    """The backend ("xformers" or "sdpa") used for tensors on ``device``."""
    device_type = torch.device(device).type
    return _BACKENDS.get(device_type) or _choose_backend(device_type)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, *, causal: bool = False
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(Dh)) V over (B, L, H, Dh) tensors; returns (B, L, H, Dh).

    ``causal``: position i attends to positions j <= i (queries and keys of equal length)."""
    if attention_backend(q.device) == "xformers":
        return _xformers(q, k, v, dropout_p, causal)
    return _sdpa(q, k, v, dropout_p, causal)
