"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP).

One ``dcp.save`` writes everything a run needs to continue exactly::

    {"model": ..., "optim": ..., "ema": ..., "extra_modules": ...,   # sharded DTensors
     "train": {"step", "scheduler", "data", "config", "provenance"},  # small values
     "rng": {"rank0": ..., "rank1": ...}}                             # per-rank RNG

Layout: ``<out_dir>/checkpoints/step_00000500/`` holds DCP's files plus
``COMPLETE`` (written by rank 0 after every rank has finished); a directory
without it is an interrupted save and is ignored and later replaced. Only the
newest ``keep`` complete checkpoints are kept.

Nothing here unpickles arbitrary objects: DCP's metadata and small values are
read with restricted unpicklers (``_SafeReader``, ``_SafeLoadPlanner``) that
admit only plain containers, numbers, strings, torch dtypes/sizes and DCP's
own metadata classes.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """Admit DCP metadata classes, torch dtypes/Size and builtin containers only."""

    _builtins = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bytes",
                 "bool", "slice", "complex"}

    def find_class(self, module: str, name: str):
        if module.startswith("torch.distributed.checkpoint.") or module == "torch.distributed.checkpoint":
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if (module, name) in {("collections", "OrderedDict"), ("torch.serialization", "_get_layout"),
                               ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}:
            return super().find_class(module, name)
        if module == "builtins" and name in self._builtins:
            return super().find_class(module, name)
        if module == "enum" or (module == "torch._utils" and name == "_rebuild_tensor_v2"):
            return super().find_class(module, name)
        raise CheckpointError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class _SafeReader(FileSystemReader):
    def read_metadata(self):
        path = Path(self.path) / ".metadata"
        if not path.is_file():
            raise CheckpointError(f"{path.parent} is not a DCP checkpoint (no .metadata file)")
        with open(path, "rb") as f:
            metadata = _RestrictedUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """Small values (ints, strings, dicts) are read with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


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


def read_keys(path: str | Path) -> set[str]:
    """Flattened keys stored in a checkpoint (e.g. ``"rng.rank1"``)."""
    return set(_SafeReader(str(path)).read_metadata().state_dict_metadata)


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
    dcp.load(state, storage_reader=_SafeReader(str(path)), planner=_SafeLoadPlanner())
    return state


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


def is_checkpoint_dir(path: str | Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def fingerprint(path: str | Path) -> str:
    """A short content hash identifying a checkpoint (a teacher in provenance records).

    For a DCP directory, the sha256 of its ``.metadata`` (which lists every
    stored shard) and ``COMPLETE`` marker; for an exported file, of the file.
    """
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    files = [path / ".metadata", path / COMPLETE] if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def read_config(path: str | Path) -> dict[str, Any]:
    """The run config stored with a checkpoint directory or an exported file."""
    path = Path(path)
    if path.is_dir():
        if not is_checkpoint_dir(path):
            raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
        return json.loads((path / "config.json").read_text())
    return json.loads(_load_export(path)["config"])


def load_weights(path: str | Path, names: list[str], which: str = "ema") -> dict[str, torch.Tensor]:
    """Full (unsharded) weights ``names`` from a checkpoint, for one process.

    ``which`` is "ema" (the averaged weights, used for sampling and as a
    teacher) or "model" (the raw weights). Exported files hold one set.
    """
    path = Path(path)
    if path.is_dir():
        meta = _SafeReader(str(path)).read_metadata().state_dict_metadata
        state = {which: {}}
        for n in names:
            key = f"{which}.{n}"
            if key not in meta:
                raise CheckpointError(f"{path} has no weight {key!r}")
            state[which][n] = torch.empty(meta[key].size, dtype=meta[key].properties.dtype)
        dcp.load(state, storage_reader=_SafeReader(str(path)), planner=_SafeLoadPlanner())
        return state[which]
    weights = _load_export(path)["model"]
    missing = [n for n in names if n not in weights]
    if missing:
        raise CheckpointError(f"{path} lacks weights {missing[:5]}")
    return {n: weights[n] for n in names}


def export(path: str | Path, out: str | Path, which: str = "ema") -> Path:
    """Consolidate a sharded checkpoint into one weights-only file with its config.

    ``out`` ending in ``.safetensors`` needs the ``safetensors`` package (the
    config goes into its metadata); otherwise a ``torch.save`` file that loads
    with ``weights_only=True``.
    """
    meta = _SafeReader(str(path)).read_metadata().state_dict_metadata
    prefix = f"{which}."
    names = [k[len(prefix):] for k in meta if k.startswith(prefix) and not k.endswith("_updates")]
    weights = load_weights(path, names, which)
    config = (Path(path) / "config.json").read_text()
    provenance = json.dumps({"source": str(path), "fingerprint": fingerprint(path), "weights": which})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp),
                  metadata={"config": config, "provenance": provenance})
    else:
        torch.save({"config": config, "provenance": provenance, "model": weights}, tmp)
    tmp.replace(out)
    return out


def _load_export(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint directory or exported file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise CheckpointError(f"{path} has no flm config in its metadata")
        return {"config": meta["config"], "provenance": meta.get("provenance", "{}"),
                "model": load_file(str(path))}
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal is a bad file
        raise CheckpointError(f"{path} is not an flm export (weights-only load failed: {e})") from None
    if not isinstance(data, dict) or not {"config", "model"} <= set(data):
        raise CheckpointError(f"{path} is not an flm export (expected keys config, model)")
    return data
