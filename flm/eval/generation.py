"""Sampling every model of an evaluation on every rank (``flm.eval.harness``).

Each rank loads every model unsharded and generates a share of the batches:
batch b draws its noise from a generator seeded with (seed, b) and runs on rank
b mod world, so the samples do not depend on the number of ranks. Rank 0
gathers the token ids (gloo: only lists travel).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from flm.methods import METHODS
from flm.methods.base import Fixed
from flm.rng import batch_generator
from flm.sampling import load_sampler


@dataclass(frozen=True)
class Model:
    """One checkpoint to evaluate: where it is, its run config and a short name for tables."""

    path: Path
    kind: str
    config: dict
    label: str
    steps: tuple[int, ...] | None = None  # this checkpoint's own step counts (PATH@N+M), else --steps


@dataclass(frozen=True)
class Ranks:
    """This process's place among torchrun's workers (rank 0 of 1 without torchrun) and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_ranks(device: str) -> Ranks:
    """Join torchrun's group (gloo: only token-id lists travel) or run alone without a group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    if device == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    return Ranks(rank, world, torch.device(device))


def gather_to_main(obj: Any, ranks: Ranks) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
    if ranks.world == 1:
        return [obj]
    gathered = [None] * ranks.world if ranks.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def prompt_constraint(prompts: list[list[int]], prompt_tokens: int, device: torch.device) -> Fixed:
    """The first ``prompt_tokens`` of each window held fixed (conditional evaluation)."""
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    known = torch.zeros_like(ids, dtype=torch.bool)
    known[:, :prompt_tokens] = True
    return Fixed(ids, known)


def generate_share(sampler: Any, steps: int, num: int, batch_size: int, seed: int, ranks: Ranks,
                   bar: Any, prompts: list[list[int]] | None = None, prompt_tokens: int = 0
                   ) -> tuple[dict[int, list[list[int]]], int | None, float]:
    """This rank's batches b = rank, rank + world, ...: ({b: ids}, network evaluations, seconds).
    With ``prompts``, sample i completes the first ``prompt_tokens`` of ``prompts[i]``."""
    sizes = [min(batch_size, num - start) for start in range(0, num, batch_size)]
    batches, nfe, seconds = {}, None, 0.0
    for b in range(ranks.rank, len(sizes), ranks.world):
        generator = batch_generator(seed, b, ranks.device)
        fixed = None
        if prompts is not None:
            fixed = prompt_constraint(prompts[b * batch_size: b * batch_size + sizes[b]], prompt_tokens, ranks.device)
        start = time.perf_counter()
        ids, nfe = sampler.generate(sizes[b], steps, generator, fixed=fixed) if fixed is not None else \
            sampler.generate(sizes[b], steps, generator)
        batches[b] = ids.cpu().tolist()  # the copy waits for the device
        seconds += time.perf_counter() - start
        bar.update(1)
    return batches, nfe, seconds


def generate_all(models: list[Model], step_list: list[int], num: int, batch_size: int, seed: int,
                 teacher: str | None, ranks: Ranks, hide_bars: bool | None, prompts: list[list[int]] | None = None,
                 prompt_tokens: int = 0) -> list[dict[str, Any]]:
    """Samples of every model at every step count, on rank 0: ``{row info..., "ids"}`` (empty elsewhere).
    With ``prompts``, the samples are completions and "ids" holds only the generated continuations."""
    sets = []
    rank_batches = len(range(ranks.rank, -(-num // batch_size), ranks.world))
    runs = sum(len(m.steps or step_list) if METHODS[m.kind].any_steps else 1 for m in models)
    bar = tqdm(total=runs * rank_batches, desc="generating", unit="batch", disable=not ranks.is_main or hide_bars)
    for model in models:
        sampler = load_sampler(model.path, ranks.device, teacher=teacher)
        sampler.generate(1, 1, batch_generator(seed, 0, ranks.device))  # warm-up, not timed
        for steps in (model.steps or step_list) if sampler.any_steps else [sampler.seq_len]:
            bar.set_postfix_str(f"{model.label}, {steps} steps")
            share = generate_share(sampler, steps, num, batch_size, seed, ranks, bar, prompts, prompt_tokens)
            parts = gather_to_main(share, ranks)
            if parts is None:
                continue
            batches = {b: ids for part, _, _ in parts for b, ids in part.items()}
            seconds = sum(part_seconds for _, _, part_seconds in parts)
            sets.append({"model": model.label, "checkpoint": str(model.path), "kind": model.kind, "steps": steps,
                         "nfe": parts[0][1], "sec_per_sample": seconds / num,
                         "tokens_per_sec": num * sampler.seq_len / seconds,
                         "ids": [row[prompt_tokens:] for b in sorted(batches) for row in batches[b]]})
        del sampler
    bar.close()
    return sets
