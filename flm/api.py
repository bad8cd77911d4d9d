"""Generation from Python: load any trained model once, then generate, conditionally or not.

    import flm

    lm = flm.load("runs/tiny/checkpoints/step_00001500")        # or an exported .pt file
    out = lm.generate(num=4, steps=64, seed=0, prompt="ROMEO:")
    print(out.texts[0], out.nfe, out.seconds)

    lm.generate(num=2, steps=8, prompt="To be, or not to be", suffix="the question.")
    lm.generate(num=1, steps=8, mask=[-1, -1, 17, 4, -1, ...])  # infilling: -1 = generate

Conditioning holds given tokens fixed: ``prompt`` at the first positions,
``suffix`` at the last ones, ``mask`` anywhere (a sequence of L ids with -1 where
the model writes). Text is encoded with the model's tokenizer (no end-of-text is
added); ids can be given instead. Every method returns the given tokens
unchanged; how the other positions see them is the method's (the flows hold them
on their clean path at every step, MDLM never masks them, AR continues a prompt
prefix only). A one-step flow map starts at pure noise, where the clean path
carries no information: its one-step completions ignore the prompt (only two or
more steps let it through).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flm.data import Tokenizer
from flm.methods.base import Fixed
from flm.sampling import Sampler, load_sampler

Tokens = str | Sequence[int] | torch.Tensor


@dataclass
class Generation:
    """What :meth:`LanguageModel.generate` returns."""

    ids: torch.Tensor  # (num, L) token ids on the CPU
    texts: list[str]  # each sample decoded
    nfe: int  # network evaluations per batch
    seconds: float  # wall time of the sampling


class LanguageModel:
    """A trained model of any method with its tokenizer, loaded once."""

    def __init__(self, sampler: Sampler, tokenizer: Tokenizer) -> None:
        if tokenizer.vocab_size != sampler.vocab_size:
            raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model has "
                             f"{sampler.vocab_size}; pass the tokenizer the model was trained with")
        self.sampler, self.tokenizer = sampler, tokenizer

    @property
    def kind(self) -> str:
        return self.sampler.kind

    @property
    def seq_len(self) -> int:
        return self.sampler.seq_len

    def encode(self, tokens: Tokens, name: str) -> list[int]:
        """Text (encoded, no end-of-text added) or ids (checked against the vocabulary)."""
        ids = self.tokenizer.encode(tokens) if isinstance(tokens, str) else [int(i) for i in tokens]
        bad = [i for i in ids if not 0 <= i < self.sampler.vocab_size]
        if bad:
            raise ValueError(f"{name}: ids {bad[:5]} are outside the vocabulary [0, {self.sampler.vocab_size})")
        return ids

    def condition(self, num: int, prompt: Tokens | None = None, suffix: Tokens | None = None,
                  mask: Sequence[int] | torch.Tensor | None = None) -> Fixed | None:
        """The :class:`Fixed` tokens of a prompt, a suffix and/or an infilling mask (None: unconditional)."""
        length = self.seq_len
        ids = torch.zeros(length, dtype=torch.long)
        known = torch.zeros(length, dtype=torch.bool)
        if mask is not None:
            template = torch.as_tensor(mask, dtype=torch.long).flatten()
            if template.numel() != length:
                raise ValueError(f"mask: expected {length} entries (-1 = generate), got {template.numel()}")
            given = template >= 0
            self.encode(template[given].tolist(), "mask")
            ids[given], known[given] = template[given], True
        for name, tokens, at_end in (("prompt", prompt, False), ("suffix", suffix, True)):
            if tokens is None:
                continue
            part = torch.tensor(self.encode(tokens, name), dtype=torch.long)
            if not 0 < part.numel() <= length:
                raise ValueError(f"{name}: {part.numel()} tokens; expected 1 to {length} (the model's length)")
            where = slice(length - part.numel(), length) if at_end else slice(0, part.numel())
            if known[where].any():
                raise ValueError(f"{name} overlaps tokens already fixed by the prompt, suffix or mask "
                                 f"({int(known.sum())} fixed of {length})")
            ids[where], known[where] = part, True
        if not known.any():
            return None
        device = self.sampler.device
        return Fixed(ids.to(device).expand(num, -1), known.to(device).expand(num, -1))

    @torch.no_grad()
    def generate(self, num: int = 1, steps: int = 8, seed: int = 0, prompt: Tokens | None = None,
                 suffix: Tokens | None = None, mask: Sequence[int] | torch.Tensor | None = None) -> Generation:
        """``num`` samples in ``steps`` steps (ignored by AR, which takes one per token), seeded by
        ``seed``, holding ``prompt``/``suffix``/``mask`` fixed; see the module docstring."""
        fixed = self.condition(num, prompt, suffix, mask)
        generator = torch.Generator(device=self.sampler.device).manual_seed(int(seed))
        start = time.perf_counter()
        ids, nfe = self.sampler.generate(num, steps, generator, fixed=fixed)
        ids = ids.cpu()  # waits for the device
        seconds = time.perf_counter() - start
        return Generation(ids, [self.tokenizer.decode(row.tolist()) for row in ids], nfe, seconds)


def load(path: str | Path, device: str | torch.device = "auto", tokenizer: str | Path | None = None,
         teacher: str | Path | None = None, **options: Any) -> LanguageModel:
    """Load a checkpoint directory (EMA weights) or an exported file of any method.

    ``device``: "auto" (CUDA if available, else CPU) or a torch device. ``tokenizer``:
    a tokenizer file or dataset directory, by default the dataset the model was trained on.
    ``teacher`` replaces the FLM teacher recorded in a stage-1 map; other ``options``
    go to the method (e.g. ``top_p=0.9`` for AR).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sampler = load_sampler(path, device, teacher=None if teacher is None else str(teacher), **options)
    tok_path = Path(tokenizer) if tokenizer is not None else Path(sampler.config["data"]["path"])
    if not tok_path.exists():
        raise FileNotFoundError(f"tokenizer {tok_path} not found (moved dataset?); pass tokenizer=")
    return LanguageModel(sampler, Tokenizer.load(tok_path))
