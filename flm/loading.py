"""Reading trained models for inference: no training state, no optimizer.

A trained model is a checkpoint directory written by :mod:`flm.checkpoint`
(its EMA weights are used) or a single file written by :func:`export`. Both
carry the run's config, so a model is rebuilt from what is on disk alone.

Nothing here unpickles arbitrary objects: DCP's metadata and small values are
read with restricted unpicklers (``SafeReader``, ``SafeLoadPlanner``) that
admit only plain containers, numbers, strings, torch dtypes/sizes and DCP's
own metadata classes; exported files load with ``weights_only=True``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from flm.config import ModelConfig, from_dict

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


class SafeReader(FileSystemReader):
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


class SafeLoadPlanner(DefaultLoadPlanner):
    """Small values (ints, strings, dicts) are read with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def read_keys(path: str | Path) -> set[str]:
    """Flattened keys stored in a checkpoint (e.g. ``"rng.rank1"``)."""
    return set(SafeReader(str(path)).read_metadata().state_dict_metadata)


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
        meta = SafeReader(str(path)).read_metadata().state_dict_metadata
        state = {which: {}}
        for n in names:
            key = f"{which}.{n}"
            if key not in meta:
                raise CheckpointError(f"{path} has no weight {key!r}")
            state[which][n] = torch.empty(meta[key].size, dtype=meta[key].properties.dtype)
        dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())
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
    meta = SafeReader(str(path)).read_metadata().state_dict_metadata
    prefix = f"{which}."
    names = [k[len(prefix):] for k in meta if k.startswith(prefix) and not k.endswith("_updates")]
    weights = load_weights(path, names, which)
    config = (Path(path) / "config.json").read_text()
    provenance = json.dumps({"source": str(path), "fingerprint": fingerprint(path), "weights": which})
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    try:  # written beside ``out`` and renamed onto it: ``out`` is whole or absent, never half-written
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp),
                      metadata={"config": config, "provenance": provenance})
        else:
            torch.save({"config": config, "provenance": provenance, "model": weights}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write {out} ({e}); nothing was written there") from e
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


def model_config_of(path: str | Path) -> ModelConfig:
    """The backbone config stored with a checkpoint directory or exported file."""
    return from_dict(ModelConfig, read_config(path)["model"])


def load_model(path: str | Path, device: torch.device | str = "cpu", which: str = "ema") -> torch.nn.Module:
    """The trained DiT of ``path`` on one process, in eval mode, gradients off."""
    from flm.model import DiT

    net = DiT(model_config_of(path)).to(device)
    net.load_state_dict(load_weights(path, [n for n, _ in net.named_parameters()], which))
    net.requires_grad_(False)
    return net.eval()


def load_frozen(path: str | Path, mesh, precision: str, device: torch.device) -> torch.nn.Module:
    """A frozen network with the EMA weights of ``path``, sharded over ``mesh`` with FSDP2
    (a teacher inside a distributed training step); ``mesh=None`` is :func:`load_model`."""
    if mesh is None:
        return load_model(path, device)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from flm.distributed import shard_model
    from flm.model import DiT

    path = Path(path)
    with torch.device("meta"):
        net = DiT(model_config_of(path))
    shard_model(net, mesh, precision)
    net.to_empty(device=device)
    if path.is_dir():  # each rank reads just its shards
        dcp.load({"ema": {n: p.detach() for n, p in net.named_parameters()}},
                 storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())
    else:
        full = load_weights(path, [n for n, _ in net.named_parameters()])
        set_model_state_dict(net, full, options=StateDictOptions(full_state_dict=True))
    net.requires_grad_(False)
    return net.eval()
