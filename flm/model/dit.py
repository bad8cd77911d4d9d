"""The DiT backbone of the FLM denoiser D(x, t) and the flow-map students (method.md section 4).

    h_0   = x @ W_in                                  (x: ids, dense (B, L, V) state, or given)
    c     = SiLU(emb(t))            or  SiLU(emb(s) + emb'(t)) with two times
            (emb: sinusoidal features of time_scale * t, then an MLP)
    h_i+1 = Block_i(h_i, c, rope)                    (adaLN-modulated attention + MLP)
    D     = Linear(modulate(LN(h_n), shift(c), scale(c)))   -> logits (B, L, V)

Each block, with (shift, scale, gate) x 2 = Linear(c) (zero at init: blocks start as
the identity) and modulate(y, shift, scale) = y (1 + scale) + shift:

    h = h + gate_a * Proj(Attention(RoPE(Q), RoPE(K), V))(modulate(LN(h), shift_a, scale_a))
        (bidirectional; logits soft-capped at cfg.attn_softcap when it is > 0)
    h = h + gate_m * MLP(modulate(LN(h), shift_m, scale_m)),   MLP = Linear, GELU(tanh), Linear

LN has no affine parameters and is computed in float32. ``cfg.dropout`` applies to the
two residual branches (as in MDLM's DDiT), not to the attention probabilities. The
output layer is zero at init, so a fresh model predicts uniform logits (all zeros).

Module names: ``tok_emb`` (nn.Embedding whose weight is W_in, V x d), ``time_emb`` and
``time_emb2`` (the second time embedding emb', only with ``cfg.two_times``; its last
layer is ``time_emb2.mlp[-1]``), ``blocks`` (nn.ModuleList of :class:`DiTBlock`, each
called as ``block(h, c, rope)``), ``final`` (its projection is ``final.linear``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from flm.config import ModelConfig
from flm.flow import embed_noisy_tokens
from flm.model.attention import attention
from flm.model.losses import TokenLoss, linear_cross_entropy

# A loss on the output layer: head(features (B, L, d), W_out (V, d), b_out (V,)) -> anything.
Head = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]

_INIT_STD = 0.02


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, in float32, returned in x's dtype."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=1e-6).type_as(x)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1.0 + scale) + shift


def rotary(seq_len: int, head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """RoPE (cos, sin) of the angles p theta^(-2k/Dh), positions p < L, pairs k < Dh/2: (L, Dh/2, 2).

    Computed on the fly in float32: no buffer to re-initialise after meta construction.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def _apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_2k, x_2k+1) of every head of x (B, L, H, Dh) by its angle; in float32."""
    x0, x1 = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    cos, sin = rope.float()[:, None, :, :].unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


class TimeEmbedding(nn.Module):
    """emb(t) = MLP([cos(a t f_k), sin(a t f_k)]), f_k = 10000^(-k/(F/2)), k < F/2.

    a = ``scale`` (``ModelConfig.time_scale``): 1 feeds raw t as the authors do; 1000
    scales t like a diffusion step index (this project's original default).
    """

    def __init__(self, cond_dim: int, freq_dim: int = 256, scale: float = 1000.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.scale = float(scale)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        k = torch.arange(half, device=t.device, dtype=torch.float32)
        freqs = torch.exp(-math.log(10000.0) / half * k)
        args = self.scale * t.float()[:, None] * freqs[None, :]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class KVCache:
    """Keys and values of every layer for left-to-right decoding (the AR baseline).

    Buffers of ``max_len`` positions are allocated at the first call of each layer;
    ``append`` writes the new positions and returns the keys and values so far.
    A prefix of several tokens can only be fed first (causal attention of equal-length
    queries and keys); later calls feed one token each.
    """

    def __init__(self, max_len: int) -> None:
        self.max_len, self.length = max_len, 0
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[1]
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full ({self.length} + {n})")
        if n > 1 and self.length > 0:
            raise ValueError("after the first call, feed one token at a time")
        if layer not in self.keys:
            self.keys[layer] = k.new_empty(k.shape[0], self.max_len, *k.shape[2:])
            self.values[layer] = v.new_empty(v.shape[0], self.max_len, *v.shape[2:])
        end = self.length + n
        self.keys[layer][:, self.length:end] = k
        self.values[layer][:, self.length:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]


class DiTBlock(nn.Module):
    """One adaLN transformer block: ``forward(h (B, L, d), c (B, cond_dim), rope (L, Dh/2, 2))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.dim % cfg.n_heads or (cfg.dim // cfg.n_heads) % 2:
            raise ValueError(f"dim {cfg.dim} must split into {cfg.n_heads} heads of even width")
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.causal = cfg.causal
        hidden = int(cfg.mlp_ratio * cfg.dim)
        self.adaLN = nn.Linear(cfg.cond_dim, 6 * cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, cfg.dim)
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.softcap = float(cfg.attn_softcap)

    def forward(self, h: torch.Tensor, c: torch.Tensor, rope: torch.Tensor,
                cache: tuple[KVCache, int] | None = None) -> torch.Tensor:
        """``cache`` = (KVCache, layer index): h holds only the new positions, whose
        ``rope`` rows are passed; keys and values of earlier positions come from the cache."""
        batch, seq_len, dim = h.shape
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN(c)[:, None, :].chunk(6, dim=-1)
        x = _modulate(_layer_norm(h), shift_a, scale_a)
        q, k, v = self.qkv(x).view(batch, seq_len, 3, self.n_heads, self.head_dim).unbind(2)
        q, k = _apply_rotary(q, rope), _apply_rotary(k, rope)
        if cache is not None:
            k, v = cache[0].append(cache[1], k, v)
        a = attention(q, k, v, causal=self.causal and seq_len > 1, softcap=self.softcap)
        h = h + gate_a * self.dropout(self.proj(a.reshape(batch, seq_len, dim)))
        x = _modulate(_layer_norm(h), shift_m, scale_m)
        return h + gate_m * self.dropout(self.mlp(x))


class FinalLayer(nn.Module):
    """logits = linear(modulate(LN(h), shift(c), scale(c))); ``adaLN`` and ``linear`` zero at init."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.adaLN = nn.Linear(cfg.cond_dim, 2 * cfg.dim)
        self.linear = nn.Linear(cfg.dim, cfg.vocab_size)

    def features(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The input of ``linear``: modulate(LN(h), shift(c), scale(c))."""
        shift, scale = self.adaLN(c)[:, None, :].chunk(2, dim=-1)
        return _modulate(_layer_norm(h), shift, scale)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(h, c))

    def loss(self, h: torch.Tensor, c: torch.Tensor, targets: torch.Tensor) -> TokenLoss:
        """Cross entropy of ``forward(h, c)`` against ``targets`` without the (B, L, V) logits."""
        return linear_cross_entropy(self.features(h, c), self.linear.weight, self.linear.bias, targets)


class DiT(nn.Module):
    """Bidirectional DiT mapping a state x (ids, dense (B, L, V), or embedded) and times to logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size + cfg.extra_input_ids, cfg.dim)
        self.time_emb = TimeEmbedding(cfg.cond_dim, scale=cfg.time_scale)
        self.time_emb2 = TimeEmbedding(cfg.cond_dim, scale=cfg.time_scale) if cfg.two_times else None
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.n_layers))
        self.final = FinalLayer(cfg)
        if not self.tok_emb.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter from the current RNG (there are no buffers).

        Embedding and linear weights ~ N(0, 0.02^2), biases 0; the blocks' adaLN and the
        whole final layer 0. Works after ``DiT(cfg)`` on the meta device + ``to_empty``.
        """
        nn.init.normal_(self.tok_emb.weight, std=_INIT_STD)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=_INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for layer in [block.adaLN for block in self.blocks] + [self.final.adaLN, self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition(self, t: torch.Tensor, t2: torch.Tensor | None = None) -> torch.Tensor:
        """c = SiLU(emb(t)), or SiLU(emb(t) + emb'(t2)) for a two-time model; (B, cond_dim)."""
        if (t2 is None) == (self.time_emb2 is not None):
            raise ValueError(f"two_times={self.cfg.two_times} but t2 was {'not ' if t2 is None else ''}given")
        e = self.time_emb(t)
        if self.time_emb2 is not None:
            e = e + self.time_emb2(t2)
        return F.silu(e)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        t2: torch.Tensor | None = None,
        *,
        g: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        cache: KVCache | None = None,
        targets: torch.Tensor | None = None,
        head: Head | None = None,
    ) -> torch.Tensor | TokenLoss:
        """Logits D(x, t) (or g(x, s=t, t=t2) for a two-time model), shape (B, L, V).

        x: LongTensor ids (B, L), looked up as e(x) @ W_in = W_in[x]; or a float dense
        state (B, L, V), embedded as x @ W_in (equal to the lookup for one-hot x).
        With ``g`` (B,) and ids x, the input is the interpolant x_g = (1-g) eps + g e(x),
        embedded by the low-rank shortcut :func:`flm.flow.embed_noisy_tokens` with
        standard normal ``noise`` (B, L, d) or noise drawn from ``generator``; it runs
        here so that W_in is read inside this module's forward
        (unsharded under FSDP2). t, t2: (B,) in [0, 1].
        ``cache`` (causal models, ids only): x holds the positions after those already
        cached (see :class:`KVCache`); the cache advances by x's length.
        ``targets`` (B, L) ids: return their cross entropy under the logits instead,
        a :class:`flm.model.losses.TokenLoss` computed in chunks without the (B, L, V)
        logits (here, so that the output layer is unsharded under FSDP2).
        ``head``: return ``head(features, W_out, b_out)`` instead of the logits, where
        features (B, L, d) are the final layer's input to its linear map: a loss that
        reduces the output projection in chunks (FMLM's :func:`flm.model.losses.linear_map_error`).
        """
        w_in = self.tok_emb.weight
        if g is not None:
            h = embed_noisy_tokens(w_in, x, g, generator, z=noise)
        elif x.is_floating_point():
            h = x.to(w_in.dtype) @ w_in[: x.shape[-1]]
        else:
            h = self.tok_emb(x)
        return self.forward_embedded(h, t, t2, cache=cache, targets=targets, head=head)

    def forward_embedded(
        self, h: torch.Tensor, t: torch.Tensor, t2: torch.Tensor | None = None, cache: KVCache | None = None,
        targets: torch.Tensor | None = None, head: Head | None = None,
    ) -> torch.Tensor | TokenLoss:
        """Logits (or, with ``targets``, their TokenLoss) from an embedded input h = x @ W_in (B, L, d)."""
        c = self.condition(t, t2)
        start = 0 if cache is None else cache.length
        rope = rotary(start + h.shape[1], self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta, h.device)[start:]
        for i, block in enumerate(self.blocks):
            h = block(h, c, rope) if cache is None else block(h, c, rope, (cache, i))
        if cache is not None:
            cache.length += h.shape[1]
        if head is not None:
            return head(self.final.features(h, c), self.final.linear.weight, self.final.linear.bias)
        return self.final(h, c) if targets is None else self.final.loss(h, c, targets)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count; ``exclude_embedding`` leaves out W_in (V x d) but keeps the output layer."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embedding else n

    def flops_per_token(self, seq_len: int | None = None, dense_input: bool = False) -> int:
        """Training (forward + backward) FLOPs per token, the usual 6N + attention estimate.

            6 * (n_layers * (4 d^2 + 2 d d_mlp) + d V  [+ V d if dense_input])
              + 12 * n_layers * d * L

        N counts the per-token matmul weights: qkv and proj (4 d^2), MLP (2 d d_mlp), the
        output layer (d V) and, for dense (B, L, V) inputs, the x @ W_in matmul (V d;
        an id lookup costs nothing). 12 n_layers d L is QK^T and AV (2 * 2 L d per layer,
        x3 for backward). Per-sequence work (time embeddings, adaLN), norms, softmax and
        the low-rank shortcut (d^2 per token plus one V d^2 Gram per step) are left out.
        Forward-only cost is one third of this.
        """
        cfg = self.cfg
        seq_len = cfg.seq_len if seq_len is None else seq_len
        d_mlp = int(cfg.mlp_ratio * cfg.dim)
        n_matmul = cfg.n_layers * (4 * cfg.dim**2 + 2 * cfg.dim * d_mlp) + cfg.dim * cfg.vocab_size
        if dense_input:
            n_matmul += cfg.vocab_size * cfg.dim
        return 6 * n_matmul + 12 * cfg.n_layers * cfg.dim * seq_len
