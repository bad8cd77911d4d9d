"""Every source of randomness of a run, in one place.

Randomness comes from generators seeded by integer parts (seed, step, rank or
example index, stream), never from a global stream that depends on history, so
a resumed step draws exactly what the uninterrupted step drew and a step does
not depend on how the global batch is split over ranks.

Streams: 0 training, 1 validation, 2 in-training samples, 99 dropout.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (seed, step, rank, example, stream).

    Deterministic across processes and Python versions, and distinct for
    distinct parts (unlike ``hash`` of a tuple, where hash(-1) == hash(-2)).
    """
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def step_generator(seed: int, step: int, rank: int, device: torch.device, stream: int = 0) -> torch.Generator:
    """Randomness of one step on one rank; ``rank=-1`` gives the generator shared by
    all ranks (stratified times, intervals: drawn for the whole global batch)."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, step, rank, stream))
    return g


def example_generators(seed: int, step: int, indices: torch.Tensor | range, device: torch.device,
                       stream: int = 0) -> list[torch.Generator]:
    """One generator per example, seeded by (seed, step, global example index).

    Noise drawn from these does not depend on how the global batch is split
    over ranks, so a run resumed on another number of processes sees the same
    noise for the same example.
    """
    gens = []
    for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices):
        g = torch.Generator(device=device)
        g.manual_seed(derive_seed(seed, step, i, stream))
        gens.append(g)
    return gens


def example_normal(shape: tuple[int, ...], gens: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """Standard normal (len(gens), *shape), example b drawn from ``gens[b]``.

    Drawn in place into one preallocated tensor (no per-example tensors and no
    stack); example b holds exactly the values ``torch.randn(shape, generator=gens[b])``
    would give, so the noise does not depend on how a batch is split over ranks.
    """
    out = torch.empty((len(gens), *shape), device=device)
    for row, g in zip(out, gens):
        row.normal_(generator=g)
    return out


def example_uniform(shape: tuple[int, ...], gens: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """U[0, 1) of shape (len(gens), *shape), example b drawn from ``gens[b]`` (in place, as
    :func:`example_normal`: the values of ``torch.rand(shape, generator=gens[b])``)."""
    out = torch.empty((len(gens), *shape), device=device)
    for row, g in zip(out, gens):
        row.uniform_(generator=g)
    return out


def batch_generator(seed: int, batch: int, device: torch.device) -> torch.Generator:
    """The generator of evaluation batch ``batch``: the same on any rank and for any world size."""
    state = np.random.SeedSequence([seed, batch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def rng_state() -> torch.Tensor:
    """This rank's torch RNG state (CPU and, if present, the current CUDA device)."""
    parts = [torch.get_rng_state()]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_rng_state())
    return torch.cat(parts)


def set_rng_state(state: torch.Tensor) -> None:
    n = torch.get_rng_state().numel()
    torch.set_rng_state(state[:n].clone())
    if torch.cuda.is_available() and state.numel() > n:
        torch.cuda.set_rng_state(state[n:].clone())
