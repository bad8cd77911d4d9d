"""Typed settings for every run, loaded from a Python config file plus overrides.

A config file (``configs/*.py``) is plain Python that defines ``config``, a
:class:`Config` instance::

    from flm.config import Config, ModelConfig
    config = Config(model=ModelConfig(dim=768, n_layers=12), ...)

``load_config(path, overrides)`` executes the file and applies ``--key=value``
overrides addressed by dotted paths (``--optim.lr=1e-4``, ``--steps=100``).
Unknown keys are errors that list the valid ones; values are converted to the
field's declared type, so ``--optim.lr=3e-4`` arrives as a float.
"""

from __future__ import annotations

import dataclasses
import json
import runpy
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A config file or override that cannot be applied."""


@dataclass
class ModelConfig:
    """The DiT denoiser / flow-map backbone (method.md section 4)."""

    vocab_size: int = 8192
    seq_len: int = 128
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    cond_dim: int = 128  # time-conditioning width
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    rope_theta: float = 10000.0
    # A second time embedding emb'(t) for flow-map students g(x, s, t), h(x, s, t).
    two_times: bool = False
    # Causal attention (the autoregressive baseline).
    causal: bool = False
    # Input ids beyond the vocabulary (MDLM's mask, AR's start id = vocab_size); never predicted.
    extra_input_ids: int = 0
    # Attention logit soft-capping c tanh(z / c) (the authors' DiT: 50); 0 = off.
    attn_softcap: float = 0.0
    # t in [0, 1] is multiplied by this before the sinusoidal time features. The authors
    # feed raw t (1.0, set in the paper configs); the default 1000 is this project's
    # original choice, kept so that checkpoints whose config predates the field (and
    # therefore lacks it) load with the behaviour they were trained with.
    time_scale: float = 1000.0


@dataclass
class DataConfig:
    path: str = "data/shakespeare/tokens"  # a dataset directory written by tools/pretokenize.py
    train_split: str = "train"
    val_split: str = "validation"
    num_workers: int = 1


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 2500
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0
    ema_decay: float = 0.9999


@dataclass
class FlowConfig:
    """The teacher's time map and objective options (method.md section 1)."""

    use_tau: bool = True  # False: g = t (the ablation)
    # Draw the Gaussian part of x_g @ W_in as N(0, W_in^T W_in) per token instead
    # of materialising the (B, L, V) noise (method.md, note at the end of section 1).
    low_rank_noise: bool = True


@dataclass
class DistillConfig:
    """Distillation: FMLM stages (method.md section 2) and SDTT rounds (the discrete baseline)."""

    teacher: str = ""  # FLM (FMLM) or MDLM/SDTT (SDTT) checkpoint, dir or exported file; EMA weights
    # SDTT only: the sampling steps N the teacher is distilled at; the student learns to
    # match two teacher steps of size 1/N in one step of 2/N (N/2 steps). Halve it each round.
    teacher_steps: int = 1024
    stage1: str = ""  # stage-2 only: the frozen stage-1 residual flow map
    boundary_prob: int = 64  # force (s, t) = (0, 1) with probability 1/boundary_prob
    # Learnable loss weighting loss * exp(-w) + w: "st" w(s, t), "s" w(s) (the authors'
    # stage 1), "none" (the authors' stage 2). Replaces the former ``learn_weighting``
    # (True -> "st", False -> "none" when an old config is read, see ``upgrade``).
    weighting: Literal["none", "s", "st"] = "st"
    # Stage 1: the student's two no-grad target forwards run in the student's current
    # mode (train: dropout active, as in the released code); False puts the student in
    # eval mode for them (flm.flow_map.fmlm_stage1_loss).
    target_dropout: bool = True
    # The frozen teacher (and stage-1 map) on every rank: "replicated" = a full copy in the
    # compute dtype, no communication; "sharded" = FSDP2 like the student, an all-gather of
    # every block on each of their forwards (less memory). tools/memplan.py shows both.
    frozen_placement: Literal["replicated", "sharded"] = "replicated"

    @staticmethod
    def upgrade(data: dict[str, Any]) -> dict[str, Any]:
        """Map fields of older stored configs onto the current ones (``from_dict``)."""
        data = dict(data)
        legacy = data.pop("learn_weighting", None)
        if legacy is not None and "weighting" not in data:
            data["weighting"] = "st" if legacy else "none"
        return data


@dataclass
class DistConfig:
    """How the job is laid out over processes (method.md section 4, torchrun)."""

    # Data-parallel replicas across nodes (HSDP); 1 = plain FSDP over all ranks.
    # -1 = one replica per node, taken from torchrun's LOCAL_WORLD_SIZE.
    replicate: int = 1
    activation_checkpointing: Literal["off", "full", "selective"] = "off"
    mixed_precision: Literal["bf16", "fp32"] = "bf16"
    compile: bool = False  # torch.compile each block (flm.distributed.compile_blocks, inductor)
    # Seconds any collective may wait for the other ranks before the run fails with an
    # error naming the step and operation (a stuck or dead rank). Longer than the
    # slowest step, evaluation or checkpoint save.
    timeout_s: int = 1800


@dataclass
class Config:
    objective: str = "flm"  # a method of flm.methods.METHODS: flm, fmlm_stage1, fmlm_stage2, mdlm, ar
    out_dir: str = "runs/default"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 32  # global sequences per optimizer step
    grad_accum: int = 1  # micro-batches per step on each rank
    resume: str = "auto"  # "auto" (newest complete checkpoint in out_dir), "none", or a path

    log_every: int = 10
    eval_every: int = 250
    eval_batches: int = 8  # validation batches per rank at each evaluation
    sample_every: int = 500
    sample_steps: list[int] = field(default_factory=lambda: [1, 8, 64])
    num_samples: int = 2
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    # Stop (exit code 76) after this many consecutive steps with a non-finite loss or
    # gradient norm, each of which is skipped; 0 never stops (docs/reliability.md).
    max_bad_steps: int = 10

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self) -> Config:
        """Check values that no type can express; returns self."""
        from flm.methods import METHODS  # the registry imports this module

        if self.objective not in METHODS:
            raise ConfigError(f"objective={self.objective!r}: expected one of {sorted(METHODS)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _convert(value: Any, typ: Any, key: str) -> Any:
    """Coerce an override value (string from the CLI, or already parsed by fire)."""
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise ConfigError(f"{key}={value!r}: expected one of {list(choices)}")
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={value!r}: expected a boolean")
    if typ in (int, float, str):
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key}={value!r}: expected an integer")
        try:
            return typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}: expected {typ.__name__}") from None
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.strip("[]() ").split(",") if v.strip()]
        (inner, *_) = typing.get_args(typ)
        items = [_convert(v, inner, key) for v in value]
        return tuple(items) if origin is tuple else items
    return value


def apply_overrides(cfg: Any, overrides: dict[str, Any], prefix: str = "") -> Any:
    """Set dotted keys (``optim.lr``) on a nested dataclass; unknown keys are errors."""
    for dotted, value in overrides.items():
        obj, parts = cfg, dotted.split(".")
        for i, part in enumerate(parts):
            types = _field_types(type(obj))
            if part not in types:
                where = ".".join(parts[:i]) or "config"
                raise ConfigError(
                    f"unknown config key {prefix}{dotted!r}: {where} has no field {part!r}; "
                    f"valid: {sorted(types)}"
                )
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(types[part]):
                    raise ConfigError(f"{dotted!r} is a section; set one of its fields")
                setattr(obj, part, _convert(value, types[part], dotted))
            else:
                obj = getattr(obj, part)
    return cfg.validate() if isinstance(cfg, Config) else cfg


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a nested dataclass from :meth:`Config.to_dict` output (checkpoints).

    Fields missing from ``data`` take their dataclass defaults; a class with an
    ``upgrade(data) -> data`` static method first maps renamed fields of older configs.
    """
    upgrade = getattr(cls, "upgrade", None)
    if upgrade is not None:
        data = upgrade(data)
    kwargs = {}
    for name, typ in _field_types(cls).items():
        if name not in data:
            continue
        value = data[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = from_dict(typ, value)
        else:
            kwargs[name] = _convert(value, typ, name)
    return cls(**kwargs)


def parse_int_list(name: str, value: Any) -> list[int]:
    """A command-line list of ints: "1,2,4", "[1, 2]", (1, 2) or 1 (as fire passes them)."""
    items = value if isinstance(value, (list, tuple)) else str(value).strip("[]() ").split(",")
    try:
        return [int(str(item).strip()) for item in items if str(item).strip()]
    except ValueError:
        raise ConfigError(f"--{name}={value!r}: expected comma-separated integers") from None


def parse_bool(name: str, value: Any) -> bool:
    """A command-line boolean: True/False or true/false/yes/no/on/off/1/0."""
    try:
        return _convert(value, bool, f"--{name}")
    except ConfigError:
        raise ConfigError(f"--{name}={value!r}: expected true or false") from None


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    """Execute a config file (which must define ``config``) and apply overrides."""
    if path is None:
        cfg = Config()
    else:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        namespace = runpy.run_path(str(path))
        cfg = namespace.get("config")
        if not isinstance(cfg, Config):
            raise ConfigError(f"{path} must define `config = Config(...)`, found {type(cfg).__name__}")
    return apply_overrides(cfg, overrides)
