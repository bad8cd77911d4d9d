"""Frozen networks of distillation for the plans, without their checkpoints.

A frozen network's config is its checkpoint's own if the checkpoint exists, else
that of the config file in ``configs/`` whose ``out_dir`` holds the checkpoint
path (:class:`ConfigResolver`). :class:`SkeletonLoader` builds the networks from
those configs on the current (fake) device, placed as training places them.
"""

from __future__ import annotations

import copy
import inspect
import runpy
from pathlib import Path
from typing import Any

import torch

from flm.config import Config, ModelConfig, from_dict, load_config
from flm.distributed import local_tensor
from flm.loading import FrozenLoader, frozen_skeleton, read_config
from flm.methods import METHODS


def _config_files(configs_dir: Path | None) -> dict[str, Path]:
    """out_dir -> config file, for every config file of ``configs_dir``."""
    found: dict[str, Path] = {}
    for path in sorted(Path(configs_dir).glob("*.py")) if configs_dir else []:
        cfg = runpy.run_path(str(path)).get("config")
        if isinstance(cfg, Config):
            found[str(Path(cfg.out_dir))] = path
    return found


def _run_dir(checkpoint: str) -> str:
    """runs/x/checkpoints/step_N -> runs/x; runs/x/model.pt -> runs/x."""
    path = Path(checkpoint)
    return str(path.parent.parent if path.parent.name == "checkpoints" else path.parent)


class ConfigResolver:
    """The config a checkpoint path was (or will be) trained with, without reading weights:
    the checkpoint's stored config if it exists, else the config file whose ``out_dir``
    holds the path."""

    def __init__(self, configs_dir: Path | None) -> None:
        self.by_out_dir = _config_files(configs_dir)
        self.cache: dict[str, dict[str, Any]] = {}
        self.sources: dict[str, str] = {}

    def __call__(self, path: str) -> dict[str, Any] | None:
        if path not in self.cache:
            file = self.by_out_dir.get(_run_dir(path))
            if Path(path).exists():
                self.cache[path], self.sources[path] = read_config(path), "the checkpoint's config"
            elif file is not None:
                cfg = load_config(file)
                cfg.model = trained_model(cfg, self)
                self.cache[path], self.sources[path] = cfg.to_dict(), f"{file.name} (out_dir {cfg.out_dir})"
            else:
                return None
        return self.cache[path]


class _ConfigOnly(FrozenLoader):
    """Reads frozen networks' configs; builds nothing (to learn what a config trains)."""

    def __init__(self, resolve: ConfigResolver) -> None:
        self.resolve = resolve

    def config(self, path):
        found = self.resolve(str(path))
        if found is None:
            raise FileNotFoundError(f"{path}: no checkpoint, and no config file with out_dir {_run_dir(path)}")
        return found

    def fingerprint(self, path):
        return "memplan"

    def load(self, path, mesh, precision, device, placement):
        return None


def takes_frozen_loader(method_cls) -> bool:
    return "frozen_loader" in inspect.signature(method_cls.build).parameters


def trained_model(cfg: Config, resolve: ConfigResolver) -> ModelConfig:
    """``cfg.model`` as the method's ``build`` sets it (a distillation student takes its
    teacher's backbone), without loading or building any network."""
    c = copy.deepcopy(cfg)
    c.distill.weighting = "none"  # nothing to shard
    method_cls = METHODS[c.objective]
    kwargs = {"frozen_loader": _ConfigOnly(resolve)} if takes_frozen_loader(method_cls) else {}
    method_cls.build(c, None, torch.device("cpu"), **kwargs)
    return c.model


class SkeletonLoader(_ConfigOnly):
    """Frozen networks built from their configs on the current (fake) device, placed as in
    training (:func:`flm.loading.frozen_skeleton`); with real tensors their weights are
    small random numbers (the memory test needs finite values, not a trained teacher)."""

    def __init__(self, resolve: ConfigResolver, fake: bool) -> None:
        super().__init__(resolve)
        self.fake, self.built = fake, []

    def load(self, path, mesh, precision, device, placement):
        cfg = from_dict(ModelConfig, self.config(path)["model"])
        net = frozen_skeleton(cfg, mesh, precision, device, placement)
        if not self.fake:
            with torch.no_grad():
                for p in net.parameters():
                    local_tensor(p).normal_(0.0, 0.02)
        self.built.append(net)
        return net
