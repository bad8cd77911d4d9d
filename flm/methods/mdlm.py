"""MDLM: masked (absorbing-state) discrete diffusion, the paper's discrete baseline.

Our time convention is FLM's: t = 0 is pure noise (every token masked), t = 1 is
data. With the log-linear schedule each token is kept with probability
alpha(t) = t and replaced by the mask id m = V otherwise:

    z_t,l = x_l  with probability t,   m  with probability 1 - t.

SUBS parameterisation: the network's output has V logits, so the mask can never
be predicted, and positions that are not masked carry their token over (their
prediction is the one-hot of z_l). The continuous-time NELBO is then

    NELBO = E_{t ~ U[0, 1]} [ alpha'(t) / (1 - alpha(t)) sum_{l: z_l = m} -log p_theta(x_l | z_t) ]
          = E_t [ 1 / (1 - t) sum_{l masked} -log p_theta(x_l | z_t) ],

a bound on -log p(x) in nats; the loss is its token sum, so the loop's division
by the token count makes the training and validation loss the NELBO in nats per
token. t is stratified over the global batch on [0, 1 - EPS] (the weight
1 / (1 - t) stays finite; the interval left out holds a fraction EPS of masks).

Ancestral sampling on t_i = i / N: from z at t_i each masked token is revealed
with probability (alpha(t_{i+1}) - alpha(t_i)) / (1 - alpha(t_i)) = (t_{i+1} - t_i) / (1 - t_i),
its value drawn from p_theta(. | z, t_i); revealed tokens never change. The last
step (t_N = 1) reveals every remaining mask. One network evaluation per step.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from flm.config import Config
from flm.methods.base import Batch, Fixed, LossOutput, no_options, stratified_times
from flm.rng import example_uniform

EPS = 1e-3  # training times t in [0, 1 - EPS]


def subs_log_probs(logits: torch.Tensor, z: torch.Tensor, mask_id: int) -> torch.Tensor:
    """log p_theta(. | z) under SUBS, float32 (B, L, V): log_softmax of the V logits at
    masked positions; at unmasked positions 0 at the carried token and -inf elsewhere."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    kept = z != mask_id
    carried = torch.full_like(logp, float("-inf"))
    carried.scatter_(-1, z.clamp(max=logp.shape[-1] - 1).unsqueeze(-1), 0.0)
    return torch.where(kept.unsqueeze(-1), carried, logp)


def mask_tokens(ids: torch.Tensor, t: torch.Tensor, gens: list[torch.Generator], mask_id: int) -> torch.Tensor:
    """z_t: each token kept with probability t (per example), else the mask id; u from ``gens[b]``."""
    u = example_uniform((ids.shape[1],), gens, ids.device)
    return torch.where(u < t[:, None].to(u.dtype), ids, torch.full_like(ids, mask_id))


def mdlm_loss(model: nn.Module, ids: torch.Tensor, t: torch.Tensor, gens: list[torch.Generator],
              mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NELBO token sum 1/(1 - t) sum_{l masked} -log p_theta(x_l | z_t), and its per-example
    mean per token (detached)."""
    z = mask_tokens(ids, t, gens, mask_id)
    logp = subs_log_probs(model(z, t), z, mask_id)
    nll = -logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # 0 where carried over
    masked = z == mask_id
    nelbo = torch.where(masked, nll / (1.0 - t.float())[:, None].clamp_min(EPS), 0.0)
    return nelbo.sum(), nelbo.detach().mean(1)


@torch.no_grad()
def mdlm_sample(model: nn.Module, num: int, seq_len: int, mask_id: int, steps: int,
                generator: torch.Generator, fixed: Fixed | None = None) -> torch.Tensor:
    """Ancestral sampling in ``steps`` steps from all-masks (see the module docstring); ids (num, L).
    ``fixed`` positions start unmasked, so SUBS carries them to the end."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = generator.device
    z = torch.full((num, seq_len), mask_id, dtype=torch.long, device=device)
    if fixed is not None:
        z = fixed.apply(z)
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    for i in range(steps):
        t = grid[i].item()
        probs = subs_log_probs(model(z, torch.full((num,), t, device=device)), z, mask_id).exp()
        draw = torch.multinomial(probs.flatten(0, 1).double(), 1, generator=generator).view(num, seq_len)
        reveal_prob = (grid[i + 1].item() - t) / (1.0 - t)
        u = torch.rand(num, seq_len, generator=generator, device=device, dtype=torch.float64)
        reveal = (z == mask_id) & ((u < reveal_prob) if i < steps - 1 else True)
        z = torch.where(reveal, draw, z)
    return z


class MDLM:
    """Masked diffusion language model on the DiT backbone with token-id input (one extra
    input id, the mask m = V)."""

    name: ClassVar[str] = "mdlm"
    bucket_label: ClassVar[str] = "loss_by_t/t"
    weighted: ClassVar[bool] = False
    any_steps: ClassVar[bool] = True

    def __init__(self, seq_len: int, vocab_size: int) -> None:
        self.seq_len, self.vocab_size, self.mask_id = seq_len, vocab_size, vocab_size
        self.cost, self.dense_input = 1.0, False
        self.provenance: dict[str, dict[str, str]] = {}
        self.extra_modules: dict[str, nn.Module] = {}

    @classmethod
    def build(cls, cfg: Config, mesh: Any, device: torch.device) -> MDLM:
        cfg.model.two_times, cfg.model.causal, cfg.model.extra_input_ids = False, False, 1
        return cls(cfg.model.seq_len, cfg.model.vocab_size)

    @classmethod
    def for_generation(cls, config: dict, device: torch.device, **options: Any) -> MDLM:
        no_options(cls.name, options)
        return cls(int(config["model"]["seq_len"]), int(config["model"]["vocab_size"]))

    def init_model(self, model: nn.Module) -> None:
        pass

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        t = stratified_times(batch.num_global, batch.index, batch.shared, t_max=1.0 - EPS)
        loss_sum, per_example = mdlm_loss(model, batch.ids, t, batch.gens, self.mask_id)
        return LossOutput(loss_sum, loss_sum, per_example, t)

    def sample(self, model: nn.Module, num: int, steps: int, generator: torch.Generator,
               fixed: Fixed | None = None) -> tuple[torch.Tensor, int]:
        return mdlm_sample(model, num, self.seq_len, self.mask_id, steps, generator, fixed), steps

    def scalars(self, device: torch.device) -> dict[str, float]:
        return {}
