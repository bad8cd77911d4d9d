"""Multi-head attention with one backend per process and device type.

    out_h = softmax(cap(Q_h K_h^T / sqrt(Dh)) + M) V_h        for every head h,

with tensors laid out (B, L, H, Dh) in and out; M = 0 (bidirectional) or, with
``causal=True``, -inf above the diagonal (position i attends to j <= i); cap is the
identity, or with ``softcap = c > 0`` the logit soft-capping cap(z) = c tanh(z / c)
(flash-attn's ``softcap``; the authors' DiT uses c = 50). Dropout on the attention
probabilities is applied with probability ``dropout_p``; callers pass 0 outside
training.

Backends. Without soft-capping: xformers' ``memory_efficient_attention`` on CUDA when
its kernels load (probed once with a tiny call), torch's ``scaled_dot_product_attention``
everywhere else or when the probe fails. Neither can soft-cap, so ``softcap > 0`` takes
its own path: torch's ``flex_attention`` (compiled once, the cap as a ``score_mod``) on
CUDA, and an explicit implementation (materialised L x L logits, float32 or wider) on
other devices or with attention dropout (flex_attention has none).

Choosing the backend. :func:`select_backend` decides for a device type and records the
choice; call it once the device is known and before the first forward (the training
loop does so right after joining the process group). Choosing may run tensor ops (the
xformers probe on CUDA), and an op run inside a forward that is under selective
activation checkpointing would be cached by the checkpoint and handed to the wrong op
when the block is recomputed in the backward pass. So the probe always runs on a fresh
thread: dispatch modes (the checkpoint's op cache), autocast, grad mode and saved-tensor
hooks are thread-local, so nothing of the caller's forward sees its ops. A first
:func:`attention` call without a prior selection is therefore safe too (it selects
through the same isolated probe), but under ``torch.compile(fullgraph=True)`` the
selection must happen before compiling.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("flm")

BACKENDS = ("sdpa", "xformers")

# device type ("cuda", "cpu", ...) -> backend name; filled once per process.
_BACKENDS: dict[str, str] = {}


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
          causal: bool = False) -> torch.Tensor:
    """torch SDPA expects (B, H, L, Dh): transpose in and out."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, is_causal=causal
    )
    return out.transpose(1, 2)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
              causal: bool = False) -> torch.Tensor:
    """xformers' native layout is (B, L, H, Dh) ("BMHK"); default scale 1/sqrt(Dh)."""
    from xformers.ops import LowerTriangularMask, memory_efficient_attention

    return memory_efficient_attention(q, k, v, attn_bias=LowerTriangularMask() if causal else None, p=dropout_p)


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, causal: bool,
              softcap: float) -> torch.Tensor:
    """The formula itself, with (B, H, L, L) logits in float32 (float64 stays float64)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), k.to(dtype)) / math.sqrt(q.shape[-1])
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if causal:
        above = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    probs = scores.softmax(dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.to(dtype)).to(q.dtype)


@functools.cache
def _score_mod(softcap: float, causal: bool) -> Callable[..., torch.Tensor]:
    """flex_attention's score_mod for cap (and mask); one function object per setting,
    so the compiled kernel is reused rather than recompiled for every call."""

    def score_mod(score, b, h, q_idx, kv_idx):
        score = softcap * torch.tanh(score / softcap)
        if causal:
            score = torch.where(q_idx >= kv_idx, score, float("-inf"))
        return score

    return score_mod


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softcap: float,
          compiled: bool = True) -> torch.Tensor:
    """Soft-capped attention through flex_attention ((B, H, L, Dh) layout, scale
    1/sqrt(Dh) applied before ``score_mod``). ``compiled=False`` runs flex_attention's
    eager reference (slow; used to check the score_mod on CPU)."""
    if compiled:
        fn = _compiled_flex()
    else:
        from torch.nn.attention.flex_attention import flex_attention as fn
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=_score_mod(float(softcap), causal))
    return out.transpose(1, 2)


def _xformers_kernels_load(device: torch.device) -> bool:
    """One tiny bf16 call on ``device``; any failure means "no"."""
    try:
        with torch.cuda.device(device):
            x = torch.randn(1, 4, 2, 64, device=device, dtype=torch.bfloat16)
            out = _xformers(x, x, x, 0.0)
            torch.cuda.synchronize(device)
        return bool(torch.isfinite(out).all())
    except Exception as exc:  # ImportError, missing kernels, unsupported GPU, ...
        log.debug("xformers probe failed: %r", exc)
        return False


def _probe(device: torch.device) -> str:
    """The backend for ``device``'s type. Runs tensor ops on CUDA: call it only through
    :func:`_isolated` (see the module docstring)."""
    return "xformers" if device.type == "cuda" and _xformers_kernels_load(device) else "sdpa"


def _isolated(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on a fresh thread, which starts with no dispatch modes, autocast,
    grad mode or saved-tensor hooks of the calling thread; exceptions are re-raised."""
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller
            error.append(exc)

    thread = threading.Thread(target=target, name="flm-attention-probe", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


@torch.compiler.disable
def select_backend(device: torch.device | str, backend: str | None = None) -> str:
    """Choose (once) and record the attention backend for ``device``'s type; returns it.

    ``backend=None`` probes (xformers on CUDA when its kernels load, else SDPA) unless a
    backend was already chosen for this device type; "sdpa" or "xformers" forces one.
    Call it before the first forward on that device type (see the module docstring).
    """
    device = torch.device(device)
    if backend is None:
        if device.type in _BACKENDS:
            return _BACKENDS[device.type]
        if device.type == "cuda" and device.index is None:  # the probe thread has its own current device
            device = torch.device("cuda", torch.cuda.current_device())
        backend = _isolated(_probe, device)
    elif backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected one of {list(BACKENDS)}")
    _BACKENDS[device.type] = backend
    log.info("attention backend on %s: %s", device.type, backend)
    return backend


def attention_backend(device: torch.device | str) -> str:
    """The backend ("xformers" or "sdpa") used for uncapped attention on ``device``."""
    device = torch.device(device)
    return _BACKENDS.get(device.type) or select_backend(device)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, *,
    causal: bool = False, softcap: float = 0.0,
) -> torch.Tensor:
    """softmax(cap(Q K^T / sqrt(Dh)) + M) V over (B, L, H, Dh) tensors; returns (B, L, H, Dh).

    ``causal``: lower-triangular mask M. ``softcap`` c > 0: cap(z) = c tanh(z / c);
    0 leaves the logits as they are (and the backend chosen by :func:`select_backend`).
    """
    if softcap < 0:
        raise ValueError(f"softcap={softcap}: expected >= 0 (0 = off)")
    if softcap > 0:
        if q.device.type == "cuda" and dropout_p == 0.0:
            return _flex(q, k, v, causal, softcap)
        return _explicit(q, k, v, dropout_p, causal, softcap)
    if attention_backend(q.device) == "xformers":
        return _xformers(q, k, v, dropout_p, causal)
    return _sdpa(q, k, v, dropout_p, causal)
