"""Generation from a trained model of any method, on one process.

    sampler = load_sampler("runs/tiny/checkpoints/step_00001500")
    ids, nfe = sampler.generate(num=4, steps=8, generator=torch.Generator().manual_seed(0))

The samplers themselves belong to their methods (``flm/methods/``); this module
reads a checkpoint directory (EMA weights) or an exported file, finds its method
in the registry from the stored ``objective`` and pairs the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flm.loading import load_model, read_config
from flm.methods import METHODS, Method
from flm.methods.base import Fixed
from flm.model import select_backend


@dataclass
class Sampler:
    """A trained model and its method, ready to generate on one device."""

    kind: str  # the run's objective, a key of METHODS
    config: dict  # the run's stored config
    method: Method
    model: nn.Module
    device: torch.device

    @property
    def seq_len(self) -> int:
        return int(self.config["model"]["seq_len"])

    @property
    def vocab_size(self) -> int:
        return int(self.config["model"]["vocab_size"])

    @property
    def any_steps(self) -> bool:
        """False for methods whose step count is fixed (AR: one network evaluation per token)."""
        return self.method.any_steps

    @torch.no_grad()
    def generate(self, num: int, steps: int, generator: torch.Generator, fixed: Fixed | None = None
                 ) -> tuple[torch.Tensor, int]:
        """Token ids (num, L) from ``steps`` steps, and the number of network evaluations;
        ``fixed`` tokens are held (see :class:`flm.methods.base.Fixed`)."""
        if fixed is None:
            return self.method.sample(self.model, num, steps, generator)
        return self.method.sample(self.model, num, steps, generator, fixed=fixed)


def load_sampler(path: str | Path, device: torch.device | str = "cpu", teacher: str | None = None,
                 **options: Any) -> Sampler:
    """Load a checkpoint directory (its EMA weights) or an exported file for sampling.

    ``teacher`` replaces the FLM teacher recorded in the run's config (a stage-1
    map samples with it; point it at a moved copy). ``options`` go to the method
    (e.g. ``top_p=`` for AR); a method refuses options it does not take.
    """
    device = torch.device(device)
    select_backend(device)
    config = read_config(path)
    if teacher is not None:
        config.setdefault("distill", {})["teacher"] = str(teacher)
    kind = config.get("objective", "flm")
    if kind not in METHODS:
        raise ValueError(f"{path}: unknown model kind (objective) {kind!r}; expected one of {sorted(METHODS)}")
    options = {k: v for k, v in options.items() if v is not None}
    method = METHODS[kind].for_generation(config, device, **options)
    return Sampler(kind, config, method, load_model(path, device), device)
