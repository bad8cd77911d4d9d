"""Output projection + loss without the (tokens, V) outputs held at once: the cross
entropy of the teachers (below) and the squared map errors of FMLM distillation
(:func:`linear_map_error`, at the end).

    CE_i = logsumexp_v(h_i W^T + b)_v - (h_i W^T + b)_{y_i},   loss = sum_i CE_i.

:func:`linear_cross_entropy` goes over the tokens in chunks: each chunk's float32
logits are formed, reduced to the CE and, when gradients are wanted, turned at once
into this chunk's share of dL/dh, dL/dW and dL/db (dL/dlogits = softmax - onehot);
then they are dropped. The backward pass only scales those gradients by dL/dloss, so
the cost is that of the unfused path (one forward and two gradient matmuls; no
recomputed logits), and the memory is one chunk of logits plus one gradient of W
(float32 while chunks accumulate) instead of logits, their log-softmax and their
gradient for every token. The gradient of W, b is the gradient of the *sum*: only the
summed loss is differentiable; the per-token CE comes back detached (loss-by-t figures).

Dtypes follow the unfused path ``F.cross_entropy(F.linear(h, W, b).float(), y)``: the
logits are computed in h's dtype (bf16 under FSDP mixed precision) and reduced in
float32, and dL/dlogits is cast back to h's dtype for the gradient matmuls.

Under FSDP2 call this inside the root module's forward, where W is unsharded (the DiT
does so when asked for ``targets``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# float32 logits per chunk. On GPUs (memory to spare, launches and the per-chunk weight-gradient
# update to amortise) 1 GiB: 5341 tokens at V = 50257 instead of all 65536 of an owt_small
# micro-batch (13 GiB); elsewhere 64 MiB: 524 tokens at V = 32000.
CHUNK_BYTES = {"cuda": 1 << 30}
DEFAULT_CHUNK_BYTES = 64 << 20


class TokenLoss(NamedTuple):
    """Cross entropy of every token: ``sum`` (scalar, differentiable) and ``per_token``
    (float32, the input's leading shape, detached)."""

    sum: torch.Tensor
    per_token: torch.Tensor


def chunk_tokens(vocab_size: int, device: torch.device | str = "cpu", chunk_bytes: int | None = None) -> int:
    """Tokens per chunk so that a chunk's float32 logits take about ``chunk_bytes``
    (default: ``CHUNK_BYTES`` of the device type, else ``DEFAULT_CHUNK_BYTES``)."""
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES.get(torch.device(device).type, DEFAULT_CHUNK_BYTES)
    return max(1, chunk_bytes // (4 * vocab_size))


def _chunk_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE per row of float32 logits (n, V), which are overwritten with softmax(logits).

    In place, so that a chunk costs one (n, V) buffer: l_y is read first, then
    l <- exp(l - max l), s = sum l, CE = max l + log s - l_y, l <- l / s.
    """
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    top = logits.amax(dim=1, keepdim=True)
    total = logits.sub_(top).exp_().sum(dim=1, keepdim=True)
    logits.div_(total)
    return (top + total.log()).squeeze(1) - picked


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                targets: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        n = h.shape[0]
        ce = torch.empty(n, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        # float32 accumulators across chunks (the unfused path accumulates in one matmul)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if want_b else None
        rows = torch.arange(min(chunk, n), device=h.device)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            hc, yc = h[start:end], targets[start:end]
            grad = F.linear(hc, weight, bias).float()
            ce[start:end] = _chunk_ce(grad, yc)  # grad now holds softmax(logits)
            grad[rows[:end - start], yc] -= 1.0  # dCE/dlogits = softmax - onehot
            grad = grad.to(h.dtype)
            if want_h:
                torch.mm(grad, weight, out=grad_h[start:end])
            if want_w and grad.dtype == grad_w.dtype:  # straight into the float32 accumulator
                grad_w.addmm_(grad.mT, hc)
            elif want_w:  # bf16 / fp16 weights: the product, then the float32 sum
                grad_w.add_(grad.mT @ hc)
            if want_b:
                grad_b.add_(grad.sum(0, dtype=torch.float32))
            del grad
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(ce)
        return ce.sum(), ce

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_ce: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_loss.to(torch.float32)
        out_h = None if grad_h is None else grad_h * scale.to(grad_h.dtype)
        out_w = None if grad_w is None else (grad_w * scale).to(w_dtype)
        out_b = None if grad_b is None else (grad_b * scale).to(b_dtype)
        return out_h, out_w, out_b, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk: int | None = None) -> TokenLoss:
    """CE of ``h @ weight.T + bias`` against ``targets``, ``chunk`` tokens at a time.

    ``h`` (..., d), ``weight`` (V, d), ``bias`` (V,) or None, ``targets`` (...) int ids.
    Returns :class:`TokenLoss` (sum over tokens, per-token CE of shape ``targets.shape``).
    ``chunk`` defaults to :func:`chunk_tokens` of V and the device. Gradients are computed in the
    forward pass when autograd will want them (see the module docstring); only
    first-order ``backward`` is supported.
    """
    shape = targets.shape
    h2, y = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if h2.shape[0] != y.shape[0]:
        raise ValueError(f"h {tuple(h.shape)} and targets {tuple(shape)} disagree on the tokens")
    chunk = chunk_tokens(weight.shape[0], h.device) if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    tensors = (h2, weight) if bias is None else (h2, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        total, ce = _LinearCrossEntropy.apply(h2, weight, bias, y, chunk)
        return TokenLoss(total, ce.view(shape))
    ce = h2.new_zeros(h2.shape[0], dtype=torch.float32)
    for s in range(0, h2.shape[0], chunk):
        ce[s:s + chunk] = _chunk_ce(F.linear(h2[s:s + chunk], weight, bias).float(), y[s:s + chunk])
    return TokenLoss(ce.sum(), ce.view(shape))


# --------------------------------------------------------------------------- map errors


def _chunk_map_error(out: torch.Tensor, target: torch.Tensor, coeff: torch.Tensor,
                     softmax: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(error e, softmax q or None) of one chunk's float32 outputs, in ``out``'s buffer."""
    if softmax:
        q = torch.softmax(out, dim=-1)
        return out.copy_(target).sub_(q), q
    return out.mul_(-coeff[:, None]).add_(target), None


class _LinearMapError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                target: torch.Tensor, coeff: torch.Tensor, softmax: bool, chunk: int) -> torch.Tensor:
        loss = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, min(start + chunk, h.shape[0]))
            err, _ = _chunk_map_error(F.linear(h[rows], weight, bias).float(), target[rows], coeff[rows], softmax)
            loss[rows] = torch.linalg.vector_norm(err, dim=-1).square()
        if softmax:
            loss.mul_(coeff)
        ctx.save_for_backward(h, weight, bias, target, coeff)
        ctx.options = (softmax, chunk)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        h, weight, bias, target, coeff = ctx.saved_tensors
        softmax, chunk = ctx.options
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if want_b else None
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, min(start + chunk, h.shape[0]))
            hc = h[rows]
            err, q = _chunk_map_error(F.linear(hc, weight, bias).float(), target[rows], coeff[rows], softmax)
            # d loss / d e = 2 e (stage 1: e = T - c g, so d/dg = -2 c e; stage 2: d/dq = -2 c e)
            grad = err.mul_((-2.0 * coeff[rows] * grad_loss[rows])[:, None])
            if softmax:  # through the softmax: q * (dq - sum_v q dq)
                grad.sub_((q * grad).sum(-1, keepdim=True)).mul_(q)
            grad = grad.to(h.dtype)
            if want_h:
                torch.mm(grad, weight, out=grad_h[rows])
            if want_w:
                grad_w.add_(grad.mT @ hc)
            if want_b:
                grad_b.add_(grad.sum(0, dtype=torch.float32))
            del grad, q
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def linear_map_error(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                     coeff: torch.Tensor, softmax: bool, chunk: int | None = None) -> torch.Tensor:
    """Per-token squared error of the output layer against a fixed float32 target, in chunks.

    With o = h W^T + b (computed as ``F.linear`` in h's dtype, then float32):

    * ``softmax=False`` (FMLM stage 1, raw outputs g = o):  loss = sum_v (target - coeff g)_v^2
    * ``softmax=True``  (FMLM stage 2, logits h = o):       loss = coeff sum_v (target - softmax(o))_v^2

    ``h`` (..., d), ``target`` (..., V), ``coeff`` (...) per token; returns the loss (...),
    differentiable in h, weight and bias (first order). Neither the outputs nor the error are
    kept for the whole input: the forward reduces them chunk by chunk, and the backward
    recomputes each chunk's outputs (one extra output-layer matmul) and turns them into its
    share of the gradients, so the memory is h, the target and one chunk (``chunk`` tokens,
    by default a quarter of :func:`chunk_tokens`: 256 MiB of float32 outputs on GPUs). Call it inside the
    root module's forward under FSDP2 (the DiT does, given ``head``).
    """
    shape = target.shape[:-1]
    h2, t2 = h.reshape(-1, h.shape[-1]), target.reshape(-1, target.shape[-1])
    c2 = coeff.expand(shape).reshape(-1).float()
    if h2.shape[0] != t2.shape[0]:
        raise ValueError(f"h {tuple(h.shape)} and target {tuple(target.shape)} disagree on the tokens")
    # a quarter of the cross entropy's chunk: a backward chunk holds about three (chunk, V) buffers
    chunk = max(1, chunk_tokens(weight.shape[0], h.device) // 4) if chunk is None else chunk
    return _LinearMapError.apply(h2, weight, bias, t2, c2, softmax, chunk).view(shape)
