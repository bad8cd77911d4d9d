"""Flow-map distillation, FMLM (method.md section 2).

Notation: dense states x of shape (B, L, V); times s <= t in [0, 1] shaped (B,);
G_s = tau(s), Delta = G_t - G_s. The flow map X_{s,t} moves x from s to t along the
FLM ODE (X_{s,s} = id, tangent d/dt X_{s,t}|_{t=s} = v(x, s), semigroup
X_{u,t} o X_{s,u} = X_{s,t}).

Every map here is written through an implied clean prediction c_{s,t}(x):

    X_{s,t}(x) = x + r * (c_{s,t}(x) - x),      r = Delta / (1 - G_s) in [0, 1],

which is the teacher's Euler step when c = softmax(D(x, s)). Working with c and the
bounded ratio r (1 - G is clamped at 1e-6) avoids dividing by a vanishing 1 - G_s
near data and the cancellation in (X - x) / Delta for short intervals.

* Stage 1 (residual, online frozen teacher D, student g_theta with raw outputs):
      c_{s,t}(x) = softmax(D(x, s)) + 0.5 Delta (1 - G_s) g(x, s, t),
      X_{s,t}(x) = x + Delta v(x, s) + 0.5 Delta^2 g(x, s, t).
* Stage 2 (one network h_theta with logits, what users sample from):
      X^h_{s,t}(x) = x + Delta (softmax(h(x, s, t)) - x) / (1 - G_s).

Models are called as D(x, t) and g(x, s, t) / h(x, s, t) on float (B, L, V) states;
their outputs are cast to float32 before any of the maths.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from flm.distill_ops import noisy_state, softmax_
from flm.flow import MIN_ONE_MINUS_G
from flm.model.losses import linear_map_error

Model = Callable[..., torch.Tensor]
TimeMap = Callable[[torch.Tensor], torch.Tensor]
Stats = dict[str, torch.Tensor | int]
Generators = torch.Generator | Sequence[torch.Generator]


def _bcast(v: torch.Tensor) -> torch.Tensor:
    """(B,) float64 coefficient -> (B, 1, 1) float32, broadcasting over (B, L, V)."""
    return v.float()[:, None, None]


def _one_minus(G: torch.Tensor) -> torch.Tensor:
    return (1.0 - G).clamp_min(MIN_ONE_MINUS_G)


def _G(tau: TimeMap, t: torch.Tensor) -> torch.Tensor:
    """G = tau(t) in float64 (the coefficients below are differences of G's)."""
    return tau(t.double())


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)


def flow_step(x: torch.Tensor, c: torch.Tensor, G_s: torch.Tensor, G_t: torch.Tensor) -> torch.Tensor:
    """X_{s,t}(x) = x + r (c - x), r = Delta / (1 - G_s) clamped to [0, 1].

    ``c`` is the implied clean prediction (B, L, V); with c = softmax(D(x, s)) this is
    one Euler step x + Delta v(x, s); with G_t = 1 it returns c.
    """
    r = ((G_t - G_s) / _one_minus(G_s)).clamp(0.0, 1.0)
    return x + _bcast(r) * (c - x)


def _residual_clean(p: torch.Tensor, g_out: torch.Tensor, G_s: torch.Tensor, G_t: torch.Tensor) -> torch.Tensor:
    """c_{s,t} = p + 0.5 Delta (1 - G_s) g, p = softmax(D(x, s))."""
    return p + _bcast(0.5 * (G_t - G_s) * _one_minus(G_s)) * g_out.float()


def stage1_clean(teacher_logits: torch.Tensor, g_out: torch.Tensor, G_s: torch.Tensor,
                 G_t: torch.Tensor) -> torch.Tensor:
    """c_{s,t}(x) = softmax(D(x, s)) + 0.5 Delta (1 - G_s) g(x, s, t), float32 (B, L, V)."""
    return _residual_clean(_probs(teacher_logits), g_out, G_s, G_t)


def stage1_map(teacher_logits: torch.Tensor, g_out: torch.Tensor, x: torch.Tensor,
               G_s: torch.Tensor, G_t: torch.Tensor) -> torch.Tensor:
    """X_{s,t}(x) = x + Delta v(x, s) + 0.5 Delta^2 g(x, s, t) = x + r (c_{s,t}(x) - x)."""
    return flow_step(x, stage1_clean(teacher_logits, g_out, G_s, G_t), G_s, G_t)


def stage2_map(h_logits: torch.Tensor, x: torch.Tensor, G_s: torch.Tensor, G_t: torch.Tensor) -> torch.Tensor:
    """X^h_{s,t}(x) = x + Delta (softmax(h(x, s, t)) - x) / (1 - G_s)."""
    return flow_step(x, _probs(h_logits), G_s, G_t)


def sample_intervals(batch_global: int, rank_slice: slice | torch.Tensor, generator: torch.Generator,
                     boundary_prob: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw this rank's intervals (s, t), float32 (B_local,) each, on the generator's device.

    d_i = 1 - (i + u) / N for global index i < N = batch_global, one u ~ U[0, 1): the
    lengths d in (0, 1] are stratified over the *global* batch; s_i ~ U[0, 1 - d_i]
    independently, t_i = s_i + d_i; each example is forced to (s, t) = (0, 1) with
    probability 1 / boundary_prob (0 disables it). method.md: 64 for stage 1, 128 for
    stage 2.

    ``generator`` must be seeded identically on every rank (by seed and step): the whole
    global batch is drawn and ``rank_slice`` (a slice or a tensor of global indices)
    picks this rank's examples, so the draw of every example does not depend on the
    world size. The noise of the losses comes from the per-rank generator instead.
    """
    u = torch.rand((), generator=generator, dtype=torch.float64, device=generator.device)
    i = torch.arange(batch_global, dtype=torch.float64, device=generator.device)
    d = 1.0 - (i + u) / batch_global
    s = torch.rand(batch_global, generator=generator, dtype=torch.float64, device=generator.device) * (1.0 - d)
    t = (s + d).clamp(max=1.0)
    if boundary_prob > 0:
        boundary = torch.rand(batch_global, generator=generator, dtype=torch.float64,
                              device=generator.device) * boundary_prob < 1.0
        s, t = s.masked_fill(boundary, 0.0), t.masked_fill(boundary, 1.0)
    return s[rank_slice].float(), t[rank_slice].float()


WEIGHTING_MODES = ("none", "s", "st")


class LossWeighting(nn.Module):
    """Learnable per-interval weighting w: loss -> loss * exp(-w) + w.

    ``mode`` "st": w(s, t), a function of both ends of the interval; "s": w(s), a
    function of the start only (t is ignored), as in the authors' released stage 1
    (``LearnableLossWeighting(is_flow=True)`` in their models/dit.py, whose t embedder
    is absent). "none" (``DistillConfig.weighting``) means no module at all.

    w is a small MLP over Fourier features sin/cos(pi 2^k s) (and sin/cos(pi 2^k t) for
    "st"), k < n_freqs; its last layer is zero-initialised, so w = 0 (no reweighting)
    at start. At the optimum exp(w) tracks the expected loss at (s, t) (or at s,
    averaged over t), which balances intervals whose errors have very different scales.
    (The authors' module embeds raw s with their sinusoidal timestep embedder and a
    GELU MLP instead: a different parametrisation of the same kind of function.)
    """

    def __init__(self, mode: str = "st", n_freqs: int = 8, hidden: int = 128) -> None:
        super().__init__()
        if mode not in ("s", "st"):
            raise ValueError(f"LossWeighting mode {mode!r}: expected 's' or 'st' ('none' is no module)")
        self.mode = mode
        n_times = 2 if mode == "st" else 1
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freqs, dtype=torch.float32), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * n_times * n_freqs, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, s: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """w(s, t) ("st") or w(s) ("s", t ignored), shape (B,)."""
        if self.mode == "st":
            if t is None:
                raise ValueError("LossWeighting('st') needs t")
            times = torch.stack([s, t], dim=-1)
        else:
            times = s[:, None]
        angles = times.float()[..., None] * self.freqs  # (B, 1 or 2, K)
        feats = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)
        return self.mlp(feats).squeeze(-1)

    def weigh(self, loss: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """loss * exp(-w) + w, per example."""
        w = self(s, t)
        return loss * torch.exp(-w) + w


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Every submodule in eval mode inside the block; each one's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _reduce(per_token: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
            weighting: LossWeighting | None) -> tuple[torch.Tensor, torch.Tensor, Stats]:
    """Mean over tokens, optional weighting, sum over examples (see fmlm_stage1_loss)."""
    raw = per_token.mean(dim=1)
    per_example = raw if weighting is None else weighting.weigh(raw, s, t)
    stats = {"raw_loss_sum": raw.detach().sum(), "raw_per_example": raw.detach(),
             "n_examples": per_token.shape[0], "n_tokens": per_token.numel()}
    return per_example.sum(), per_example, stats


def _as_input(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The networks' copy of a dense state: cast once per state, not once per network call."""
    return x if dtype is None or x.dtype == dtype else x.to(dtype)


def _chunks(batch: int) -> list[slice]:
    """Slices of about a quarter of the batch: the no-grad targets are built chunk by chunk,
    so their (B, L, V) intermediates exist for a quarter of the examples at a time
    (every network here treats each sequence on its own, so the values do not change)."""
    size = -(-batch // 4)
    return [slice(i, min(i + size, batch)) for i in range(0, batch, size)]


@torch.no_grad()
def _stage1_target_minus_p(student: Model, teacher: Model, x_s: torch.Tensor, x_in: torch.Tensor,
                           s: torch.Tensor, t: torch.Tensor, tau: TimeMap,
                           dtype: torch.dtype | None) -> torch.Tensor:
    """c* - softmax(D(x_s, s)) for the stage-1 target c* (see :func:`fmlm_stage1_loss`).

    Built into one new (B, L, V) buffer, a quarter of the batch at a time, with every
    step in place: besides x_s and the result, at most four (B/4, L, V) tensors are
    alive (p_s, the partial target, y_u and one network output)."""
    u = s + 0.5 * (t - s)
    G_s, G_u, G_t = _G(tau, s), _G(tau, u), _G(tau, t)
    delta = G_t - G_s
    w1 = torch.where(delta > 0, (G_u - G_s) / delta.clamp_min(1e-300), 0.5)
    w2k = torch.where(delta > 0, (G_t - G_u) / delta.clamp_min(1e-300), 0.5) * _one_minus(G_s) / _one_minus(G_u)
    a_su, a_ut = 0.5 * (G_u - G_s) * _one_minus(G_s), 0.5 * (G_t - G_u) * _one_minus(G_u)
    r_su = ((G_u - G_s) / _one_minus(G_s)).clamp(0.0, 1.0)
    out = torch.empty_like(x_s)
    for c in _chunks(x_s.shape[0]):
        x, p_s = x_s[c], softmax_(teacher(x_in[c], s[c]))
        # c_{s,u}(x_s) = p_s + a_su g(x_s, s, u), in the network output's own buffer
        c_su = student(x_in[c], s[c], u[c]).float().mul_(_bcast(a_su[c])).add_(p_s)
        y_u = torch.lerp(x, c_su, _bcast(r_su[c]))  # X_{s,u}(x_s)
        # x_s + w1 (c_su - x_s) - p_s, in c_su's buffer
        part = c_su.sub_(x).mul_(_bcast(w1[c])).add_(x).sub_(p_s)
        del p_s, c_su
        y_in = _as_input(y_u, dtype)
        c_ut = student(y_in, u[c], t[c]).float().mul_(_bcast(a_ut[c]))
        c_ut.add_(softmax_(teacher(y_in, u[c])))
        del y_in
        out[c] = part.add_(c_ut.sub_(y_u).mul_(_bcast(w2k[c])))
    return out


def fmlm_stage1_loss(student: Model, teacher: Model, x1_ids: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                     tau: TimeMap, generator: Generators, weighting: LossWeighting | None = None,
                     target_dropout: bool = True, compute_dtype: torch.dtype | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, Stats]:
    """Stage-1 residual flow-map loss (method.md section 2) for clean ids (B, L).

    x_s = interpolant at G_s (dense eps from ``generator``). Prediction
    c_{s,t}(x_s) = softmax(D(x_s, s)) + 0.5 Delta (1 - G_s) g_theta(x_s, s, t).
    Target (no gradient), two half steps through u = s + (t - s)/2 with the student's
    own g: v_hat_{a,b}(y) = v(y, a) + 0.5 (G_b - G_a) g(y, a, b),
    y_u = x_s + (G_u - G_s) v_hat_{s,u}(x_s),
    v_hat = [(G_u - G_s) v_hat_{s,u}(x_s) + (G_t - G_u) v_hat_{u,t}(y_u)] / Delta,
    c* = x_s + (1 - G_s) v_hat, evaluated as
    c* = x_s + w1 (c_{s,u}(x_s) - x_s) + w2 (1 - G_s)/(1 - G_u) (c_{u,t}(y_u) - y_u),
    w1 = (G_u - G_s)/Delta, w2 = (G_t - G_u)/Delta (w1 = w2 = 1/2 where Delta = 0).
    Loss per token sum_V (c* - c_{s,t}(x_s))^2, per example the mean over its L tokens,
    then loss * exp(-w) + w with ``weighting``.

    Calls: D(x_s, s) once (shared by prediction and target), D(y_u, u), g(x_s, s, u) and
    g(y_u, u, t) without grad, g(x_s, s, t) with grad.

    Dropout in the target (``target_dropout``, ``DistillConfig.target_dropout``). The
    teacher D is frozen and in eval mode: never any dropout. The student's two no-grad
    target forwards g(x_s, s, u), g(y_u, u, t) run, with ``target_dropout=True`` (the
    default), in whatever mode the student is in. The training loop calls
    ``model.train()`` before every step, so with ``model.dropout > 0`` they are
    dropout-perturbed like the prediction: this is what the released code does
    (algo.py ``FLM_distill.loss`` calls the student backbone for the target inside
    ``torch.no_grad()`` in train mode -- trainer_base ``_train_mode`` sets
    ``backbone.train()``, Lightning >= 2.2 keeps submodule modes, ``model=small`` has
    dropout 0.1 -- while its teacher is ``.eval()``), and we keep it for fidelity.
    ``target_dropout=False`` puts the student (which must then be the ``nn.Module``
    itself, not a wrapper function) into eval mode for the two target forwards only,
    giving the deterministic target of the network the sampler uses. Validation runs
    the model in eval mode, so there the target is dropout-free either way.

    Returns (sum over the B examples of the per-example (weighted) loss -- divide by the
    global number of examples --, per-example loss (B,), stats) where stats holds
    ``raw_loss_sum`` (the unweighted per-example losses summed, detached), ``n_examples``
    (B) and ``n_tokens`` (B L). ``generator``: one per-rank generator or one per example (see
    :func:`flm.distill_ops.noisy_state`), on any device. ``compute_dtype``: the networks'
    input dtype (bf16 under mixed precision): each dense state is cast once and the copy
    shared by every network that reads it; the map algebra stays in float32.

    Memory: x_s is built in place; the target is formed in one buffer as
    c* - softmax(D(x_s, s)), a quarter of the batch at a time with every step in place;
    the student's output layer and the squared error run in chunks inside its forward
    (``head``: :func:`flm.model.losses.linear_map_error`), so g's (B, L, V) outputs are
    never held. The plain-autograd version this replaced is ``tools/distill_reference.py``
    (the bench's baseline and the tests' float32 reference). The student must be a
    model taking ``head`` (the DiT).
    """
    G_s, G_t = _G(tau, s), _G(tau, t)
    x_s = noisy_state(x1_ids, G_s, teacher.tok_emb.num_embeddings, generator)
    x_in = _as_input(x_s, compute_dtype)
    if target_dropout:
        base = _stage1_target_minus_p(student, teacher, x_s, x_in, s, t, tau, compute_dtype)
    else:
        if not isinstance(student, nn.Module):
            raise TypeError("target_dropout=False needs the student nn.Module (to switch it to eval mode), "
                            f"got {type(student).__name__}")
        with _eval_mode(student):
            base = _stage1_target_minus_p(student, teacher, x_s, x_in, s, t, tau, compute_dtype)
    del x_s
    a = (0.5 * (G_t - G_s) * _one_minus(G_s)).float()[:, None]  # per token: target - a g
    head = functools.partial(linear_map_error, target=base, coeff=a, softmax=False)
    return _reduce(student(x_in, s, t, head=head), s, t, weighting)


def fmlm_stage2_loss(student_h: Model, teacher: Model, stage1_g: Model, x1_ids: torch.Tensor, s: torch.Tensor,
                     t: torch.Tensor, tau: TimeMap, generator: Generators,
                     weighting: LossWeighting | None = None, compute_dtype: torch.dtype | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, Stats]:
    """Stage-2 loss: match the one-network map X^h to the frozen stage-1 map X.

    Target (no gradient) X_{s,t}(x_s) from the frozen teacher D and stage-1 g;
    prediction X^h_{s,t}(x_s) = x_s + r (softmax(h(x_s, s, t)) - x_s). Loss per token
    sum_V (X - X^h)^2 = r^2 sum_V (c_{s,t} - softmax(h))^2 (computed this way: x_s
    cancels exactly), r = Delta / (1 - G_s). That is the squared error of the maps as
    method.md states. With ``weighting=None`` (``DistillConfig.weighting="none"``) it is
    exactly the released stage-2 loss (algo.py ``FLM_distill_double.loss``: no learned
    weighting, ``(F_s_t - F_s_t_distilled)**2`` summed over V, up to their 1e-5 in
    1 - G_s): r^2 grows with the jump, so long jumps -- the one-step (0, 1) interval
    included, where r = 1 -- dominate. A learned w(s, t) would cancel that per-(s, t)
    factor (exp(w) tracks the expected loss); w(s) only its average over t.
    Calls: D(x_s, s) and g(x_s, s, t) without grad, h(x_s, s, t) with grad.
    Returns what :func:`fmlm_stage1_loss` returns; ``compute_dtype`` as there. The
    student's output layer, softmax and squared error run in chunks inside its forward
    (``head``: :func:`flm.model.losses.linear_map_error`), so the only (B, L, V) tensors
    are x_s and the target (built a quarter of the batch at a time).
    """
    G_s, G_t = _G(tau, s), _G(tau, t)
    x_s = noisy_state(x1_ids, G_s, teacher.tok_emb.num_embeddings, generator)
    x_in = _as_input(x_s, compute_dtype)
    del x_s  # the squared error of the maps does not need x_s itself (it cancels)
    a = 0.5 * (G_t - G_s) * _one_minus(G_s)
    target = torch.empty(x_in.shape, dtype=torch.float32, device=x_in.device)
    with torch.no_grad():  # c_{s,t} = p_s + 0.5 Delta (1 - G_s) g(x_s, s, t), a quarter batch at a time
        for c in _chunks(x_in.shape[0]):
            part = stage1_g(x_in[c], s[c], t[c]).float().mul_(_bcast(a[c]))
            target[c] = part.add_(softmax_(teacher(x_in[c], s[c])))
            del part
    r = ((G_t - G_s) / _one_minus(G_s)).clamp(0.0, 1.0)
    head = functools.partial(linear_map_error, target=target, coeff=r.square().float()[:, None], softmax=True)
    return _reduce(student_h(x_in, s, t, head=head), s, t, weighting)


CleanFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _few_step(clean: CleanFn, tau: TimeMap, shape: tuple[int, int, int], steps: int,
              generator: torch.Generator, fixed=None) -> torch.Tensor:
    """x <- eps; x <- X_{t_i, t_{i+1}}(x) on t_i = i/N; argmax of c_{t_{N-1}, 1} at the end.

    ``fixed`` (a :class:`flm.methods.base.Fixed`) sets the known positions of x to a draw of
    their clean path (1 - G_{t_i}) eps_i + G_{t_i} e(x), fresh eps_i, before each step and
    returns them unchanged.
    At one step the map starts from G_0 = 0, where that path is pure noise: the free
    positions of a one-step sample do not depend on the fixed tokens at all."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = torch.randn(shape, generator=generator, device=generator.device)
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64, device=x.device)
    G = _G(tau, grid)
    for i in range(steps):
        a, b = (grid[j].float().expand(shape[0]) for j in (i, i + 1))
        G_a, G_b = G[i].expand(shape[0]), G[i + 1].expand(shape[0])
        if fixed is not None and i > 0:  # at G_0 = 0 the clean path is the initial noise itself
            x = fixed.hold(x, torch.randn(shape, generator=generator, device=x.device), G[i].float())
        c = clean(x, a, b, G_a, G_b)
        if i < steps - 1:
            x = flow_step(x, c, G_a, G_b)
    return c.argmax(-1) if fixed is None else fixed.apply(c.argmax(-1))


@torch.no_grad()
def sample_stage1(teacher: Model, g_net: Model, tau: TimeMap, shape: tuple[int, int, int], steps: int,
                  generator: torch.Generator, fixed=None) -> tuple[torch.Tensor, int]:
    """Few-step sampling with the stage-1 map (teacher + residual g: two networks per step).

    ``shape`` = (B, L, V); eps is drawn on the generator's device (the models' device).
    Returns token ids (B, L) = argmax c_{t_{N-1}, 1}, and the number of network
    evaluations 2N.
    """
    def clean(x, a, b, G_a, G_b):
        return stage1_clean(teacher(x, a), g_net(x, a, b), G_a, G_b)
    return _few_step(clean, tau, shape, steps, generator, fixed), 2 * steps


@torch.no_grad()
def sample_fmlm(h_net: Model, tau: TimeMap, shape: tuple[int, int, int], steps: int,
                generator: torch.Generator, fixed=None) -> tuple[torch.Tensor, int]:
    """Few-step FMLM sampling, x <- X^h_{t_i, t_{i+1}}(x): one forward per step.

    ``shape`` = (B, L, V); eps is drawn on the generator's device (the model's device).
    Returns token ids (B, L) = argmax softmax(h(x, t_{N-1}, 1)), and N evaluations.
    """
    def clean(x, a, b, G_a, G_b):
        return _probs(h_net(x, a, b))
    return _few_step(clean, tau, shape, steps, generator, fixed), steps
