"""The contract every training method implements, and what methods share.

A *method* is one way of training and sampling a model on the DiT backbone: the
FLM teacher, the two FMLM distillation stages, MDLM, the autoregressive
baseline. ``run/train.py`` knows nothing of any of them; it calls:

    method = METHODS[cfg.objective].build(cfg, mesh, device)   # frozen nets; fixes cfg.model
    model = DiT(cfg.model) ...                                  # meta, AC, fully_shard, init
    method.init_model(model)                                    # e.g. student <- teacher
    out = method.loss(model, batch)                             # LossOutput, token sums
    ids, nfe = method.sample(model, num, steps, generator)      # in-training samples

and a trained model is generated from, on one process, with

    method = METHODS[kind].for_generation(config, device, **options)
    ids, nfe = method.sample(load_model(path), num, steps, generator)

(see :func:`flm.sampling.load_sampler`). Adding a method is one file with a
class that has the members of :class:`Method` and one line in
``flm/methods/__init__.py``.

Loss convention: every loss is a *sum over tokens* of this rank's micro-batch;
the loop divides by the global token count of the step, so the gradient is that
of the global per-token mean whatever the world size. Methods whose loss is a
per-example quantity (the flow-map squared errors) multiply it by L.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

import torch
from torch import nn

from flm.config import Config


@dataclass
class Batch:
    """One micro-batch of a step and the randomness it may use.

    ``shared`` is seeded identically on every rank (draws for the whole global
    batch: times, intervals); ``gens[b]`` is example b's own generator (noise),
    seeded by its global index, so nothing depends on the world size.
    """

    ids: torch.Tensor  # (B, L) clean token ids of this rank's micro-batch
    index: torch.Tensor  # (B,) global index of each example within the step
    num_global: int  # examples in the global batch
    shared: torch.Generator
    gens: list[torch.Generator]


class LossOutput(NamedTuple):
    """What a method's loss returns (all sums are over this rank's tokens)."""

    objective: torch.Tensor  # token-sum that is optimised (carries the graph)
    loss: torch.Tensor  # token-sum that is reported (equal to objective unless a weighting is learnt)
    per_item: torch.Tensor  # detached reported loss per token of each example (B,), or of each token (B, L)
    bucket: torch.Tensor  # same shape, in [0, 1]: what the loss curve is bucketed by (t, t - s, l / L)


class Fixed(NamedTuple):
    """Tokens held fixed while sampling (prompts, suffixes, infilling).

    ``known[b, l]`` marks position l of sample b as given, with token ``ids[b, l]``
    (ids elsewhere are ignored). Every sampler returns them unchanged. How the
    free positions see them depends on the method: the flows hold them on their
    clean path x_g = (1 - g) eps + g e(x) at every step, MDLM never masks them,
    AR takes a prefix as its prompt.
    """

    ids: torch.Tensor  # (B, L) long
    known: torch.Tensor  # (B, L) bool

    def apply(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` (B, L) ids with the known positions set to their given tokens."""
        return torch.where(self.known, self.ids, out)

    def hold(self, x: torch.Tensor, eps: torch.Tensor, g: torch.Tensor | float) -> torch.Tensor:
        """A dense state (B, L, V) whose known positions are the interpolant (1 - g) eps + g e(x)."""
        clean = torch.nn.functional.one_hot(self.ids, x.shape[-1]).to(x.dtype)
        return torch.where(self.known[..., None], (1 - g) * eps + g * clean, x)


class Method(Protocol):
    """Members every method has (a structural type: methods do not inherit from it)."""

    name: ClassVar[str]
    bucket_label: ClassVar[str]  # TensorBoard prefix of the bucketed loss, e.g. "loss_by_t/t"
    weighted: bool  # the optimised loss differs from the reported one (log both)
    any_steps: ClassVar[bool]  # samples in any number of steps (False: AR, one step per token)
    cost: float  # network passes per step in units of one forward+backward of the model
    dense_input: bool  # the model reads dense (B, L, V) states (FLOPs of x @ W_in)
    provenance: dict[str, dict[str, str]]  # frozen networks it was built from (path, fingerprint)
    extra_modules: dict[str, nn.Module]  # trained beside the model (e.g. a loss weighting)

    @classmethod
    def build(cls, cfg: Config, mesh: Any, device: torch.device) -> Method:
        """Load frozen networks (FSDP2 over ``mesh``) and set ``cfg.model`` to the trained backbone."""

    @classmethod
    def for_generation(cls, config: dict, device: torch.device, **options: Any) -> Method:
        """The method as stored in a checkpoint's ``config``, ready to :meth:`sample` on one process."""

    def init_model(self, model: nn.Module) -> None:
        """Initialise the freshly built (materialised) model, e.g. from a teacher."""

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """The step's loss on one micro-batch."""

    def sample(self, model: nn.Module, num: int, steps: int, generator: torch.Generator,
               fixed: Fixed | None = None) -> tuple[torch.Tensor, int]:
        """``num`` sequences (num, L) of token ids in ``steps`` steps, and the network evaluations
        used; ``fixed`` holds given tokens (ValueError if the method cannot condition that way)."""

    def scalars(self, device: torch.device) -> dict[str, float]:
        """Extra curves for TensorBoard at each log step (e.g. the loss weighting); may be empty."""


def stratified_times(num_global: int, indices: torch.Tensor, shared_gen: torch.Generator,
                     t_max: float = 1.0) -> torch.Tensor:
    """t_i = t_max (i + u) / N for global example indices i, with one u ~ U[0, 1).

    ``shared_gen`` must be seeded identically on every rank (by seed and step)
    so that the N times of a step cover [0, t_max) evenly across the *global*
    batch (antithetic/stratified sampling); each rank passes the global indices
    of its own examples.
    """
    u = torch.rand((), generator=shared_gen, dtype=torch.float64, device=shared_gen.device)
    return (t_max * (indices.to(u.device).double() + u) / num_global).float()


def loss_by_bucket(t: torch.Tensor, values: torch.Tensor, buckets: int = 10) -> torch.Tensor:
    """(2, buckets) tensor of per-bucket loss sums and counts over t in [0, 1) (any equal shapes)."""
    idx = (t.clamp(0, 1 - 1e-6) * buckets).long().flatten()
    out = torch.zeros(2, buckets, dtype=torch.float64, device=t.device)
    out[0].index_add_(0, idx, values.flatten().double())
    out[1].index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
    return out


def no_options(name: str, options: dict[str, Any]) -> None:
    """Refuse generation options a method does not take (e.g. ``top_p`` for a flow)."""
    if options:
        raise ValueError(f"{name} sampling takes no options {sorted(options)}")
