"""flm.model.attention: SDPA against a naive reference, xformers against SDPA on CUDA."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import flm.model.attention as attention_module

from flm.model.attention import attention, attention_backend


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(Dh)) V per head, (B, L, H, Dh) layout."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)


def _qkv(dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(2, 7, 3, 16, generator=gen, device=device, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_sdpa_matches_naive_reference(dtype: torch.dtype, tol: float) -> None:
    q, k, v = _qkv(dtype)
    out = attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out, naive_attention(q, k, v), atol=tol, rtol=tol)


def test_sdpa_is_bidirectional() -> None:
    """Changing the last key/value changes the output at the first position (no causal mask)."""
    q, k, v = _qkv(torch.float64)
    k2, v2 = k.clone(), v.clone()
    k2[:, -1], v2[:, -1] = 0.0, 5.0
    assert not torch.allclose(attention(q, k, v)[:, 0], attention(q, k2, v2)[:, 0])


def test_dropout_is_unbiased_and_off_at_zero() -> None:
    q, k, v = _qkv(torch.float64)
    assert torch.equal(attention(q, k, v), attention(q, k, v))
    torch.manual_seed(0)
    n = 2000  # independent draws, batched: row i of the batch is draw i
    draws = attention(*(x[:1].expand(n, -1, -1, -1) for x in (q, k, v)), dropout_p=0.3)
    assert not torch.allclose(draws[0], draws[1])
    q, k, v = q[:1], k[:1], v[:1]
    # inverted dropout: E[out] = out without dropout
    err = (draws.mean(0) - attention(q, k, v)).abs() / (draws.std(0) / math.sqrt(len(draws)) + 1e-12)
    assert err.max() < 5.5


def test_backend_chosen_once_and_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(attention_module, "_BACKENDS", {})
    with caplog.at_level(logging.INFO, logger="flm"):
        assert attention_backend("cpu") == "sdpa"
        attention(*_qkv(torch.float32))
        assert attention_backend(torch.device("cpu")) == "sdpa"
    records = [r for r in caplog.records if "attention backend" in r.getMessage()]
    assert len(records) == 1 and "sdpa" in records[0].getMessage()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers vs SDPA needs a CUDA device (none here)")
def test_xformers_matches_sdpa() -> None:
    if attention_backend("cuda") != "xformers":
        pytest.skip("xformers kernels did not load on this CUDA device; SDPA is the backend")
    for dtype, tol in [(torch.float32, 2e-4), (torch.bfloat16, 2e-2)]:
        q, k, v = _qkv(dtype, device="cuda")
        out = attention(q, k, v)
        torch.testing.assert_close(out, attention_module._sdpa(q, k, v, 0.0), atol=tol, rtol=tol)
        reference = naive_attention(q.double(), k.double(), v.double())
        torch.testing.assert_close(out.double(), reference, atol=tol, rtol=tol)
