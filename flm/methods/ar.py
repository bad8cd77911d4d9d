"""The autoregressive baseline: the same DiT blocks with causal attention.

The condition is constant (t = 0 for every sequence: the adaLN layers see one
fixed vector), the input is the window shifted right behind a start id s = V
(one extra input id), and the loss is next-token cross-entropy on all L tokens:

    loss = -sum_l log p_theta(x_l | s, x_<l),

so the loop's division by the token count gives nats per token, comparable
with MDLM's NELBO. Sampling is left to right with a KV cache (one network
evaluation per token: NFE = L), at temperature 1 by default, with optional
nucleus (top-p) truncation. The step count of the diffusion samplers does not
apply: ``any_steps`` is False and ``sample`` ignores ``steps``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from flm.config import Config
from flm.methods.base import Batch, Fixed, LossOutput
from flm.model.dit import KVCache


def shift_right(ids: torch.Tensor, start_id: int) -> torch.Tensor:
    """(s, x_0, ..., x_{L-2}): the input whose position l predicts x_l."""
    return torch.cat([torch.full_like(ids[:, :1], start_id), ids[:, :-1]], dim=1)


def ar_loss(model: nn.Module, ids: torch.Tensor, start_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy token sum, and the per-token losses (B, L) detached.

    The model computes the loss in chunks, without the (B, L, V) logits (``targets``)."""
    loss = model(shift_right(ids, start_id), torch.zeros(ids.shape[0], device=ids.device), targets=ids)
    return loss.sum, loss.per_token


def next_token(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
               top_p: float = 1.0) -> torch.Tensor:
    """Draw one token per row of ``logits`` (B, V) at ``temperature``, from the smallest set of
    tokens whose probability reaches ``top_p`` (1 = the full distribution)."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)


def prompt_length(fixed: Fixed | None, seq_len: int) -> int:
    """The length k of the prefix that ``fixed`` gives (AR conditions on a prompt prefix only)."""
    if fixed is None:
        return 0
    k = int(fixed.known[0].sum())
    prefix = torch.arange(seq_len, device=fixed.known.device) < k
    if not bool((fixed.known == prefix).all()):
        raise ValueError("ar sampling conditions on a prompt prefix only (the same length for every sample); "
                         "suffixes and infilling need a diffusion or flow model")
    return k


@torch.no_grad()
def ar_sample(model: nn.Module, num: int, seq_len: int, start_id: int, generator: torch.Generator,
              temperature: float = 1.0, top_p: float = 1.0, use_cache: bool = True,
              fixed: Fixed | None = None) -> tuple[torch.Tensor, int]:
    """Left-to-right sampling of ``num`` sequences of ``seq_len`` tokens from the start id,
    continuing the prompt prefix of ``fixed`` if given; returns ids and network evaluations.

    With ``use_cache`` the first call reads the start id and the prompt, and each later
    call feeds only the newest token and attends to the cached keys and values; without
    it each step re-runs the whole prefix (same tokens for the same generator, L times
    the work)."""
    device = generator.device
    k = prompt_length(fixed, seq_len)
    t = torch.zeros(num, device=device)
    seq = torch.full((num, 1), start_id, dtype=torch.long, device=device)
    if k:
        seq = torch.cat([seq, fixed.ids[:, :k].to(device)], dim=1)
    cache = KVCache(seq_len) if use_cache else None
    calls, fed = 0, 0
    while seq.shape[1] <= seq_len:
        inp = seq[:, fed:] if use_cache else seq
        fed = seq.shape[1]
        logits = model(inp, t, cache=cache)[:, -1]
        calls += 1
        seq = torch.cat([seq, next_token(logits, generator, temperature, top_p)], dim=1)
    return seq[:, 1:], calls


class AR:
    """Autoregressive language model on the DiT backbone (causal attention, constant condition)."""

    name: ClassVar[str] = "ar"
    bucket_label: ClassVar[str] = "loss_by_position/p"  # l / L
    weighted: ClassVar[bool] = False
    any_steps: ClassVar[bool] = False

    def __init__(self, seq_len: int, vocab_size: int, temperature: float = 1.0, top_p: float = 1.0) -> None:
        if not temperature > 0 or not 0 < top_p <= 1:
            raise ValueError(f"ar sampling: temperature={temperature} must be > 0 and top_p={top_p} in (0, 1]")
        self.seq_len, self.vocab_size, self.start_id = seq_len, vocab_size, vocab_size
        self.temperature, self.top_p = temperature, top_p
        self.cost, self.dense_input = 1.0, False
        self.provenance: dict[str, dict[str, str]] = {}
        self.extra_modules: dict[str, nn.Module] = {}

    @classmethod
    def build(cls, cfg: Config, mesh: Any, device: torch.device) -> AR:
        cfg.model.two_times, cfg.model.causal, cfg.model.extra_input_ids = False, True, 1
        return cls(cfg.model.seq_len, cfg.model.vocab_size)

    @classmethod
    def for_generation(cls, config: dict, device: torch.device, temperature: float = 1.0, top_p: float = 1.0,
                       **options: Any) -> AR:
        if options:
            raise ValueError(f"ar sampling takes temperature and top_p, not {sorted(options)}")
        return cls(int(config["model"]["seq_len"]), int(config["model"]["vocab_size"]), temperature, top_p)

    def init_model(self, model: nn.Module) -> None:
        pass

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        loss_sum, per_token = ar_loss(model, batch.ids, self.start_id)
        length = batch.ids.shape[1]
        position = (torch.arange(length, device=per_token.device) / length).expand_as(per_token)
        return LossOutput(loss_sum, loss_sum, per_token, position)

    def sample(self, model: nn.Module, num: int, steps: int, generator: torch.Generator,
               fixed: Fixed | None = None) -> tuple[torch.Tensor, int]:
        return ar_sample(model, num, self.seq_len, self.start_id, generator, self.temperature, self.top_p,
                         fixed=fixed)

    def scalars(self, device: torch.device) -> dict[str, float]:
        return {}
