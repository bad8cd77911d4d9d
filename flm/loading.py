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

import functools
import hashlib
import io
import json
import os
import pickle
import warnings
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
    stored shard) and ``COMPLETE`` marker; for an exported file, of the file
    (computed in the same pass that loads it, see :func:`_read_export`).
    """
    path = Path(path)
    if not path.is_dir():
        return _load_export(path)["fingerprint"]
    h = hashlib.sha256()
    for f in (path / ".metadata", path / COMPLETE):
        _hash_file(f, h)
    return h.hexdigest()[:16]


def _hash_file(path: Path, h) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


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
        with warnings.catch_warnings():
            # DCP warns that it "assumes the intent is to load in a single process": it is.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
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
    """An exported file's config, provenance, weights and fingerprint, read once per process.

    Distillation asks for a teacher's config, fingerprint and weights separately; the
    file is read on the first call and the result is kept (keyed by the file's path,
    inode, size and mtime, so a rewritten file is read again).
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint directory or exported file")
    st = path.stat()
    return _read_export(str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_export(path: str, inode: int, size: int, mtime_ns: int) -> dict[str, Any]:
    """One read of an exported file: its bytes are hashed in one sequential pass (the
    fingerprint), then ``.pt`` files are loaded with ``mmap=True``: the tensors map the
    file, whose pages the hash has just brought into the page cache, so the weights are
    not read from storage a second time nor copied until a model takes them."""
    del inode, size, mtime_ns  # cache key only
    file = Path(path)
    h = hashlib.sha256()
    _hash_file(file, h)
    out: dict[str, Any] = {"fingerprint": h.hexdigest()[:16]}
    if file.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise CheckpointError(f"{file} has no flm config in its metadata")
        return out | {"config": meta["config"], "provenance": meta.get("provenance", "{}"),
                      "model": load_file(path)}
    try:
        try:
            data = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # files in torch's legacy (non-zip) format cannot be mapped
            if "mmap" not in str(e):
                raise
            data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal is a bad file
        raise CheckpointError(f"{file} is not an flm export (weights-only load failed: {e})") from None
    if not isinstance(data, dict) or not {"config", "model"} <= set(data):
        raise CheckpointError(f"{file} is not an flm export (expected keys config, model)")
    return out | data


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


FROZEN_PLACEMENTS = ("replicated", "sharded")


def frozen_skeleton(cfg: ModelConfig, mesh, precision: str, device: torch.device,
                    placement: str = "sharded") -> torch.nn.Module:
    """A frozen DiT with uninitialised weights, placed as a distributed step runs it.

    ``placement="sharded"``: FSDP2 over ``mesh`` like the student (each forward
    all-gathers the weights block by block); ``"replicated"``: a full copy on
    ``device`` with no FSDP (fp32 here; :class:`flm.methods.fmlm` casts it to the
    compute dtype once the student has been initialised from it).
    """
    from flm.distributed import shard_model
    from flm.model import DiT

    if placement not in FROZEN_PLACEMENTS:
        raise ValueError(f"distill.frozen_placement={placement!r}: expected one of {FROZEN_PLACEMENTS}")
    with torch.device("meta"):
        net = DiT(cfg)
    if placement == "sharded":
        shard_model(net, mesh, precision)
        net.to_empty(device=device)
    else:
        _replace_params(net, lambda p: torch.empty_like(p, device=device))  # to_empty
    net.requires_grad_(False)
    return net.eval()


def cast_frozen(net: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``net.to(dtype)`` for a frozen, unsharded network."""
    return _replace_params(net, lambda p: p.detach().to(dtype))


@torch.no_grad()
def _replace_params(net: torch.nn.Module, fn) -> torch.nn.Module:
    """Replace every parameter p by ``fn(p)`` (frozen). What ``Module.to_empty`` / ``.to`` do,
    by assignment: they cannot swap parameters that are fake tensors (:mod:`flm.memplan`)."""
    for module in net.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(fn(p), requires_grad=False))
    return net


def load_frozen(path: str | Path, mesh, precision: str, device: torch.device,
                placement: str = "sharded") -> torch.nn.Module:
    """A frozen network with the EMA weights of ``path`` inside a distributed training
    step, placed by :func:`frozen_skeleton`; ``mesh=None`` is :func:`load_model`."""
    if mesh is None:
        return load_model(path, device)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    path = Path(path)
    net = frozen_skeleton(model_config_of(path), mesh, precision, device, placement)
    names = [n for n, _ in net.named_parameters()]
    if placement == "replicated":  # every rank reads every weight
        net.load_state_dict(load_weights(path, names))
    elif path.is_dir():  # each rank reads just its shards
        dcp.load({"ema": {n: p.detach() for n, p in net.named_parameters()}},
                 storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())
    else:
        set_model_state_dict(net, load_weights(path, names), options=StateDictOptions(full_state_dict=True))
    return net


class FrozenLoader:
    """Where distillation's frozen networks come from, given their checkpoint paths.

    The default reads checkpoints (:func:`read_config`, :func:`fingerprint`,
    :func:`load_frozen`); :mod:`flm.memplan` passes one that builds the networks
    on fake tensors from config files, with no checkpoint on disk.
    """

    def config(self, path: str | Path) -> dict[str, Any]:
        return read_config(path)

    def fingerprint(self, path: str | Path) -> str:
        return fingerprint(path)

    def load(self, path: str | Path, mesh, precision: str, device: torch.device, placement: str) -> torch.nn.Module:
        return load_frozen(path, mesh, precision, device, placement)
