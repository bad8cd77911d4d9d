"""The memory-lean distillation losses (issue 10) against their plain-autograd form.

``tools/distill_reference.py`` keeps the losses as they were (every (B, L, V) intermediate
in float32 under autograd); :mod:`flm.flow_map` builds the states in place, forms the
targets a quarter batch at a time and reduces the student's output layer and squared
error in chunks (:func:`flm.model.losses.linear_map_error`). Same values and gradients
(float32 rounding), at most half the activation memory.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import flm.flow_map as fm
import flm.model.losses as losses
from conftest import load_data_tool
from flm.config import ModelConfig
from flm.distill_ops import noisy_state, softmax_
from flm.flow import get_tau, interpolate
from flm.memplan import peak_bytes
from flm.model import DiT
from flm.model.losses import linear_map_error

reference = load_data_tool("distill_reference")


def _nets(V: int, L: int, dim: int, seed: int = 0) -> tuple[DiT, DiT, DiT]:
    """A teacher, a student and a frozen stage-1 map with random (non-zero) weights."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, seq_len=L, dim=dim, n_layers=1, n_heads=2, cond_dim=16)
    teacher = DiT(cfg)
    student = DiT(dataclasses.replace(cfg, two_times=True))
    with torch.no_grad():
        for p in [*teacher.parameters(), *student.parameters()]:
            p.normal_(0.0, 0.2)
    frozen = copy.deepcopy(student)
    with torch.no_grad():
        for p in frozen.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return teacher.eval().requires_grad_(False), student, frozen.eval().requires_grad_(False)


def _gens(B: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + i) for i in range(B)]


def _run(module, stage: int, student, teacher, frozen, ids, s, t, weighting, **kwargs):
    student.zero_grad(set_to_none=True)
    tau = get_tau(teacher.tok_emb.num_embeddings)
    if stage == 1:
        out = module.fmlm_stage1_loss(student, teacher, ids, s, t, tau, _gens(len(ids)), weighting, **kwargs)
    else:
        out = module.fmlm_stage2_loss(student, teacher, frozen, ids, s, t, tau, _gens(len(ids)), weighting, **kwargs)
    out[0].backward()
    return out[0].detach(), out[1].detach(), {n: p.grad.clone() for n, p in student.named_parameters()}


def test_noisy_state_is_the_interpolant_without_one_hot():
    V, L, B = 11, 5, 3
    ids = torch.randint(0, V, (B, L))
    g = torch.tensor([0.0, 0.4, 0.97])
    eps = torch.stack([torch.randn(L, V, generator=gen) for gen in _gens(B)])
    torch.testing.assert_close(noisy_state(ids, g, V, _gens(B)), interpolate(ids, eps, g))
    one = torch.Generator().manual_seed(3)
    eps = torch.randn(B, L, V, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(noisy_state(ids, g, V, one), interpolate(ids, eps, g))


def test_softmax_in_place():
    logits = torch.randn(2, 3, 7) * 5
    expected = logits.softmax(-1)
    out = softmax_(logits)
    assert out.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(out, expected)
    half = torch.randn(2, 7, dtype=torch.bfloat16)
    torch.testing.assert_close(softmax_(half), half.float().softmax(-1))


@pytest.mark.parametrize("softmax", [False, True])
def test_linear_map_error_matches_autograd(softmax):
    torch.manual_seed(0)
    n, d, V = 10, 6, 13
    h = torch.randn(2, n // 2, d, requires_grad=True)
    w = torch.randn(V, d, requires_grad=True)
    b = torch.randn(V, requires_grad=True)
    target = torch.rand(2, n // 2, V)
    coeff = torch.rand(2, 1)
    upstream = torch.randn(2, n // 2)

    out = nn.functional.linear(h, w, b)
    err = target - (out.softmax(-1) if softmax else coeff[..., None] * out)
    expected = err.square().sum(-1) * (coeff if softmax else 1.0)
    (expected * upstream).sum().backward()
    want = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None

    got = linear_map_error(h, w, b, target.clone(), coeff, softmax=softmax, chunk=3)  # chunks of 3 tokens
    torch.testing.assert_close(got, expected)
    (got * upstream).sum().backward()
    for x, g in zip((h, w, b), want):
        torch.testing.assert_close(x.grad, g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_lean_losses_equal_the_reference(stage, weighted):
    V, L, B = 40, 6, 7  # an odd batch: chunks of 2, 2, 2, 1
    teacher, student, frozen = _nets(V, L, 16)
    ids = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(1))
    s, t = fm.sample_intervals(B, slice(None), torch.Generator().manual_seed(2), 0)
    s[0], t[0] = 0.0, 1.0  # a boundary interval
    s[1] = t[1] = 0.3  # an empty one
    weighting = fm.LossWeighting("st") if weighted else None
    if weighted:
        with torch.no_grad():
            weighting.mlp[-1].weight.normal_(0.0, 0.3)
    ref = _run(reference, stage, student, teacher, frozen, ids, s, t, weighting)
    lean = _run(fm, stage, student, teacher, frozen, ids, s, t, weighting)
    torch.testing.assert_close(lean[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lean[1], ref[1], rtol=1e-5, atol=1e-6)
    for name, g in ref[2].items():  # float32 rounding, relative to each tensor's scale
        torch.testing.assert_close(lean[2][name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=name)


@pytest.mark.parametrize("stage", [1, 2])
def test_lean_losses_halve_the_activation_peak(stage, monkeypatch):
    """Forward + backward peak, less weights and gradients (what tools/bench.py distill_step
    reports), with output chunks small next to the batch's (B, L, V) as at full size."""
    monkeypatch.setattr(losses, "DEFAULT_CHUNK_BYTES", 1 << 20)
    V, L, B = 4096, 64, 8
    teacher, student, frozen = _nets(V, L, 32)
    ids = torch.randint(0, V, (B, L))
    s, t = fm.sample_intervals(B, slice(None), torch.Generator().manual_seed(0), 0)
    params = sum(p.numel() * 4 for net in (teacher, student, frozen) for p in net.parameters())
    grads = sum(p.numel() * 4 for p in student.parameters())
    peaks = {}
    for name, module in (("reference", reference), ("lean", fm)):
        peaks[name] = peak_bytes(lambda: _run(module, stage, student, teacher, frozen, ids, s, t, None),
                                 V, L) - params - grads
    dense = B * L * V * 4
    assert peaks["lean"] <= 0.5 * peaks["reference"], {k: v / dense for k, v in peaks.items()}


def test_dense_states_are_cast_once_for_every_network():
    """Under bf16 every network reads the bf16 copy of its state, one copy per state."""
    V, L, B = 40, 6, 4
    teacher, student, frozen = _nets(V, L, 16)
    seen: list[tuple[int, torch.dtype]] = []

    class Recording(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.tok_emb = inner, inner.tok_emb

        def forward(self, x, *args, **kwargs):
            seen.append((x.untyped_storage().data_ptr(), x.dtype))
            return self.inner(x, *args, **kwargs)

    ids = torch.randint(0, V, (B, L))
    s, t = fm.sample_intervals(B, slice(None), torch.Generator().manual_seed(0), 0)
    fm.fmlm_stage1_loss(Recording(student), Recording(teacher), ids, s, t, get_tau(V), _gens(B),
                        compute_dtype=torch.bfloat16)
    chunks = len(fm._chunks(B))
    assert {dtype for _, dtype in seen} == {torch.bfloat16}
    assert len(seen) == 4 * chunks + 1  # per chunk D(x_s), g(x_s), g(y_u), D(y_u); then g(x_s) with grad
    x_s = seen[-1][0]  # every call on x_s reads the one bf16 copy; each chunk's y_u is cast once for two calls
    for c in range(chunks):
        (a, _), (b, _), (y1, _), (y2, _) = seen[4 * c:4 * c + 4]
        assert a == b == x_s and y1 == y2 != x_s
    seen.clear()
    fm.fmlm_stage2_loss(Recording(student), Recording(teacher), Recording(frozen), ids, s, t, get_tau(V), _gens(B),
                        compute_dtype=torch.bfloat16)
    assert {dtype for _, dtype in seen} == {torch.bfloat16} and len({ptr for ptr, _ in seen}) == 1  # 2n + 1 calls
