"""flm.model.attention: SDPA, causal and soft-capped paths against direct transcriptions,
backend selection (isolated from selective checkpointing), xformers against SDPA on CUDA."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable

import pytest
import torch

import flm.model.attention as attention_module

from flm.config import ModelConfig
from flm.distributed import apply_activation_checkpointing
from flm.model import DiT
from flm.model.attention import attention, attention_backend, select_backend


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    softcap: float = 0.0) -> torch.Tensor:
    """softmax(cap(Q K^T / sqrt(Dh)) + M) V per head, (B, L, H, Dh) layout, written out:
    cap(z) = softcap tanh(z / softcap) (flash-attn's softcap), M_ij = -inf for j > i."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if causal:
        n = q.shape[1]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        scores = torch.where(j <= i, scores, torch.tensor(float("-inf"), dtype=scores.dtype))
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


def test_causal_matches_masked_softmax() -> None:
    q, k, v = _qkv(torch.float64)
    out = attention(q, k, v, causal=True)
    torch.testing.assert_close(out, naive_attention(q, k, v, causal=True), atol=1e-12, rtol=1e-12)
    # position i ignores keys/values after i: changing the last one leaves all but the last output
    k2, v2 = k.clone(), v.clone()
    k2[:, -1], v2[:, -1] = 0.0, 5.0
    out2 = attention(q, k2, v2, causal=True)
    assert torch.equal(out2[:, :-1], out[:, :-1]) and not torch.allclose(out2[:, -1], out[:, -1])


@pytest.mark.parametrize("causal", [False, True])
def test_softcap_matches_direct_transcription(causal: bool) -> None:
    q, k, v = (8.0 * x for x in _qkv(torch.float64, seed=1))  # logits up to ~100: the cap matters
    cap = 5.0
    out = attention(q, k, v, causal=causal, softcap=cap)
    torch.testing.assert_close(out, naive_attention(q, k, v, causal, cap), atol=1e-12, rtol=1e-12)
    assert not torch.allclose(out, naive_attention(q, k, v, causal), atol=1e-3)
    # float32 inputs: computed in float32, returned in the input dtype
    out32 = attention(q.float(), k.float(), v.float(), causal=causal, softcap=cap)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out, atol=1e-4, rtol=1e-4)


def test_softcap_gradients_match_direct_transcription() -> None:
    qkv = [(4.0 * x).requires_grad_() for x in _qkv(torch.float64, seed=2)]
    weights = torch.randn(2, 7, 3, 16, dtype=torch.float64)
    (attention(*qkv, softcap=3.0) * weights).sum().backward()
    got = [x.grad.clone() for x in qkv]
    for x in qkv:
        x.grad = None
    (naive_attention(*qkv, softcap=3.0) * weights).sum().backward()
    for g, x in zip(got, qkv):
        torch.testing.assert_close(g, x.grad, atol=1e-10, rtol=1e-10)


def test_softcap_zero_is_the_backend_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """softcap=0 is exactly the uncapped backend; softcap > 0 never goes to xformers (it cannot cap)."""
    q, k, v = _qkv(torch.float32)
    assert torch.equal(attention(q, k, v, softcap=0.0), attention_module._sdpa(q, k, v, 0.0))
    calls = []
    monkeypatch.setattr(attention_module, "_BACKENDS", {"cpu": "xformers"})
    monkeypatch.setattr(attention_module, "_xformers", lambda q, k, v, p, causal=False: calls.append(causal) or q)
    assert attention(q, k, v, causal=True) is q and calls == [True]
    torch.testing.assert_close(attention(q, k, v, softcap=2.0), naive_attention(q, k, v, softcap=2.0))
    assert calls == [True]
    with pytest.raises(ValueError, match="softcap"):
        attention(q, k, v, softcap=-1.0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("causal", [False, True])
def test_flex_score_mod_matches_direct_transcription(causal: bool) -> None:
    """The CUDA soft-cap path's score_mod, run through flex_attention's eager reference on CPU."""
    q, k, v = (6.0 * x for x in _qkv(torch.float32, seed=3))
    out = attention_module._flex(q, k, v, causal, 4.0, compiled=False)
    reference = naive_attention(q.double(), k.double(), v.double(), causal, 4.0)
    torch.testing.assert_close(out.double(), reference, atol=1e-5, rtol=1e-5)


def test_select_backend_forced_and_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention_module, "_BACKENDS", {})
    assert select_backend("cpu", "sdpa") == "sdpa" and attention_backend("cpu") == "sdpa"
    with pytest.raises(ValueError, match="expected one of"):
        select_backend("cpu", "flash")
    probes = []
    monkeypatch.setattr(attention_module, "_probe", lambda device: probes.append(device) or "sdpa")
    assert select_backend("cpu") == "sdpa" and probes == []  # already chosen: no second probe


# ---------------------------------------------------------------- backend probe vs activation checkpointing

_CKPT_CFG = ModelConfig(vocab_size=40, seq_len=6, dim=16, n_layers=2, n_heads=2, cond_dim=8)


def _fake_probe(record: list) -> Callable[[torch.device], str]:
    """Stands in for the xformers probe: a tensor op the selective policy saves (aten.mm),
    with a shape no op of the model has, then "sdpa"."""

    def probe(device: torch.device) -> str:
        x = torch.randn(3, 5, device=device)
        record.append((threading.current_thread(), (x @ x.T).shape))
        return "sdpa"

    return probe


def _checkpointed_grads(cfg: ModelConfig, mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    apply_activation_checkpointing(model, mode)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=gen)
    t = torch.rand(2, generator=gen)
    loss = model(ids, t).logsumexp(-1).sum()
    loss.backward()
    return loss.detach(), {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_backend_probe_is_isolated_from_selective_checkpointing(monkeypatch: pytest.MonkeyPatch,
                                                                softcap: float) -> None:
    """No backend chosen before the first forward: the probe runs inside block 0's forward under
    selective checkpointing, yet on its own thread, so the backward's recompute is unaffected."""
    cfg = dataclasses.replace(_CKPT_CFG, attn_softcap=softcap)
    monkeypatch.setattr(attention_module, "_BACKENDS", {"cpu": "sdpa"})
    ref_loss, ref_grads = _checkpointed_grads(cfg, "off")
    record: list = []
    monkeypatch.setattr(attention_module, "_BACKENDS", {})
    monkeypatch.setattr(attention_module, "_probe", _fake_probe(record))
    loss, grads = _checkpointed_grads(cfg, "selective")
    if softcap == 0.0:  # (with a cap the CPU path is the explicit one: no backend, no probe)
        assert len(record) == 1 and record[0][0] is not threading.current_thread()
    torch.testing.assert_close(loss, ref_loss)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_inline_probe_breaks_selective_checkpointing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The failure the isolation prevents (the old lazy probe): run inline in block 0's forward,
    the probe's saved mm output is handed to the block's first mm when it is recomputed."""
    monkeypatch.setattr(attention_module, "_BACKENDS", {})
    monkeypatch.setattr(attention_module, "_probe", _fake_probe([]))
    monkeypatch.setattr(attention_module, "_isolated", lambda fn, *args: fn(*args))
    with pytest.raises(RuntimeError, match="shape .* is invalid"):
        _checkpointed_grads(_CKPT_CFG, "selective")


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
    if select_backend("cuda") != "xformers":
        pytest.skip("xformers kernels did not load on this CUDA device; SDPA is the backend")
    for dtype, tol in [(torch.float32, 2e-4), (torch.bfloat16, 2e-2)]:
        for causal in (False, True):
            q, k, v = _qkv(dtype, device="cuda")
            out = attention(q, k, v, causal=causal)
            torch.testing.assert_close(out, attention_module._sdpa(q, k, v, 0.0, causal), atol=tol, rtol=tol)
            reference = naive_attention(q.double(), k.double(), v.double(), causal)
            torch.testing.assert_close(out.double(), reference, atol=tol, rtol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled flex_attention needs a CUDA device (none here)")
def test_softcap_flex_matches_direct_transcription_on_cuda() -> None:
    for dtype, tol in [(torch.float32, 2e-4), (torch.bfloat16, 2e-2)]:
        for causal in (False, True):
            q, k, v = (4.0 * x for x in _qkv(dtype, device="cuda"))
            out = attention(q, k, v, causal=causal, softcap=5.0)
            reference = naive_attention(q.double(), k.double(), v.double(), causal, 5.0)
            torch.testing.assert_close(out.double(), reference, atol=tol, rtol=tol)
