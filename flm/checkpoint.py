"""Sharded training state with ``torch.distributed.checkpoint`` (DCP).

One ``dcp.save`` writes everything a run needs to continue exactly::

    {"model": ..., "optim": ..., "ema": ..., "extra_modules": ...,   # sharded DTensors
     "train": {"step", "scheduler", "data", "config", "provenance"},  # small values
     "rng": {"rank0": ..., "rank1": ...}}                             # per-rank RNG

Layout: ``<out_dir>/checkpoints/step_00000500/`` holds DCP's files plus
``COMPLETE`` (written by rank 0 after every rank has finished); a directory
without it is an interrupted save and is ignored and later replaced. Only the
newest ``keep`` complete checkpoints are kept.

Reading a trained model for inference (config, weights, export) is
:mod:`flm.loading`, which also holds the restricted unpicklers used here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from flm.loading import COMPLETE, CheckpointError, SafeLoadPlanner, SafeReader, read_keys
from flm.rng import rng_state, set_rng_state


def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())


def resolve_resume(resume: str, out_dir: str | Path) -> Path | None:
    """``auto``: newest complete checkpoint in ``out_dir`` (or none); ``none``; or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = checkpoint_dirs(out_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"--resume={resume}: not a complete checkpoint (no {COMPLETE} marker)")
    return path


def save(out_dir: str | Path, step: int, state: dict[str, Any], keep: int,
         files: dict[str, str] | None = None) -> Path:
    """Save ``state`` collectively, plus small text ``files`` (e.g. config.json);
    commit it with the COMPLETE marker, written last; prune old ones."""
    path = Path(out_dir) / "checkpoints" / f"step_{step:08d}"
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    if is_main and path.exists():  # an interrupted save of the same step
        shutil.rmtree(path)
    _barrier()
    dcp.save(state, checkpoint_id=str(path))
    _barrier()
    if is_main:
        for name, text in (files or {}).items():
            (path / name).write_text(text)
        marker = {"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1}
        (path / COMPLETE).write_text(json.dumps(marker))
        for old in checkpoint_dirs(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def load(path: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    """Fill ``state`` in place from a checkpoint (resharding DTensors as needed).

    Keys of ``state`` absent from the checkpoint are an error, except
    ``rng.rank<k>`` entries, which are dropped when the world size grew.
    """
    path = Path(path)
    stored = read_keys(path)
    rng = state.get("rng", {})
    for key in list(rng):
        if f"rng.{key}" not in stored:
            del rng[key]
    dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())
    return state


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class TrainState:
    """Everything a run needs to continue exactly, as one DCP state dict.

    ``modules`` holds every trainable module (the model, and for distillation
    the loss weighting) so that optimizer state is keyed by stable names.
    Small values (step, scheduler, data position, config, provenance) are
    stored as JSON strings, so their shape never depends on the world size.
    """

    def __init__(self, out_dir: str | Path, modules: "torch.nn.ModuleDict", optimizer, scheduler, ema,
                 loader, config_json: str, provenance: dict[str, Any] | None = None):
        self.out_dir, self.modules, self.optimizer = Path(out_dir), modules, optimizer
        self.scheduler, self.ema, self.loader = scheduler, ema, loader
        self.config_json, self.provenance = config_json, provenance or {}

    def state_dict(self, step: int) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.modules, self.optimizer)
        rank = dist.get_rank() if dist.is_initialized() else 0
        return {
            "model": model_sd, "optim": optim_sd, "ema": self.ema.state_dict(),
            "train": {"step": step, "scheduler": json.dumps(self.scheduler.state_dict()),
                      "data": json.dumps(self.loader.state_dict()), "config": self.config_json,
                      "provenance": json.dumps(self.provenance, sort_keys=True)},
            "rng": {f"rank{rank}": rng_state()},
        }

    def save(self, step: int, keep: int) -> Path:
        return save(self.out_dir, step, self.state_dict(step), keep, files={"config.json": self.config_json})

    def restore(self, path: Path | None) -> int:
        """Load ``path`` (if any) into the live objects; returns the step to continue from."""
        if path is None:
            return 0
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = load(path, self.state_dict(0))
        stored = json.loads(state["train"]["provenance"])
        if stored != self.provenance:
            raise CheckpointError(
                f"{path} was trained from {stored or 'no teacher'}, but this run uses "
                f"{self.provenance or 'no teacher'}; point --resume elsewhere or use a new out_dir")
        set_state_dict(self.modules, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        self.ema.load_state_dict(state["ema"])
        self.scheduler.load_state_dict(json.loads(state["train"]["scheduler"]))
        self.loader.load_state_dict(json.loads(state["train"]["data"]))
        for value in state["rng"].values():
            set_rng_state(value)
        return int(state["train"]["step"])


