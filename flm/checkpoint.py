"""Sharded training state with ``torch.distributed.checkpoint`` (DCP).

One ``dcp.save`` writes everything a run needs to continue exactly::

    {"model": ..., "optim": ..., "ema": ..., "extra_modules": ...,   # sharded DTensors
     "train": {"step", "scheduler", "data", "config", "provenance",  # small values (JSON)
               "dataset", "guard", "window"},
     "rng": {"rank0": ..., "rank1": ...}}                             # per-rank RNG

Layout: ``<out_dir>/checkpoints/step_00000500/`` holds DCP's files plus
``COMPLETE``, written atomically by rank 0 after every rank has written and
synced its files. What survives a kill at any moment (docs/reliability.md):

* A directory without ``COMPLETE`` is an interrupted save: ignored, and replaced
  when that step is saved again.
* A checkpoint is resumed only if ``COMPLETE`` exists *and* every file its
  ``.metadata`` refers to is present and long enough (:func:`verify`), so a
  half-deleted directory is skipped even if it still holds ``COMPLETE``.
* Old checkpoints (beyond the newest ``keep``) are first renamed to
  ``.trash-step_...`` (atomic) and only then deleted; leftovers of an interrupted
  deletion are removed at the next start.
* A failed save (full disk, read-only directory) raises :class:`CheckpointError`
  naming the checkpoint on every rank, removes the partial directory and leaves
  the previous checkpoints untouched.
* Rank 0 alone decides which checkpoint to resume and broadcasts it, so ranks
  with different views of a shared filesystem still load the same one.
* A checkpoint is refused if this run's config changes the model, the objective
  or the data it was trained on (:func:`config_changes`).

Reading a trained model for inference (config, weights, export) is
:mod:`flm.loading`, which also holds the restricted unpicklers used here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from flm import faults
from flm.data.shards import fsync_dir
from flm.loading import COMPLETE, CheckpointError, SafeLoadPlanner, SafeReader, read_keys
from flm.rng import rng_state, set_rng_state

log = logging.getLogger("flm")

TRASH = ".trash-"  # prefix of a checkpoint being deleted
_NAME = re.compile(r"step_\d{8}")

# Config fields that a resumed run may not change: the model's shape, the objective
# and its options, and which data (and in which order) the model reads. Prefixes
# end with "."; everything else (learning rate, steps, logging, layout) may change.
# The teachers (distill.teacher, distill.stage1) are compared by the provenance check
# instead, whose message names each teacher's path and fingerprint.
REFUSED = ("objective", "model.", "flow.", "distill.boundary_prob", "distill.weighting", "distill.target_dropout",
           "distill.teacher_steps", "seed",
           "batch_size", "data.train_split")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _no_dist() -> bool:
    """A single process saves and loads without DCP's collectives (``no_dist``). They would
    gain nothing there, and they cost: gloo runs them on its worker thread, whose parallel
    copies start a second OpenMP thread team that stays alive; libgomp then counts more
    threads than cores and stops spin-waiting between parallel regions, which made every
    CPU step after the first checkpoint (or a resume) 10-40% slower."""
    return _world() == 1


def _on_main(fn: Callable[[], Any], what: str) -> Any:
    """Run ``fn`` on rank 0 only and broadcast its result; if it raised, every rank
    raises CheckpointError (so no rank waits for a rank 0 that gave up)."""
    result, error = None, None
    if _rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - reported on every rank
            error = f"{what}: {type(e).__name__}: {e}"
    if _world() > 1:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error:
        raise CheckpointError(error)
    return result


def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """Checkpoints with a COMPLETE marker, oldest first (see :func:`verify` for their files)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / COMPLETE).is_file())


def verify(path: str | Path) -> str | None:
    """None if ``path`` is a complete checkpoint whose files are all there, else what is wrong."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        return f"no {COMPLETE} marker"
    try:
        metadata = SafeReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable metadata disqualifies it
        return f"unreadable .metadata ({e})"
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        try:
            actual = (path / name).stat().st_size
        except OSError:
            return f"file {name} is missing"
        if actual < size:
            return f"file {name} is truncated ({actual} of {size} bytes)"
    return None


def _choose(resume: str, out_dir: str | Path) -> Path | None:
    if resume == "none":
        return None
    if resume == "auto":
        listing = [] if faults.active("hide", "resume_listing") else checkpoint_dirs(out_dir)
        for path in reversed(listing):
            problem = verify(path)
            if problem is None:
                return path
            log.warning("skipping checkpoint %s: %s", path, problem)
        return None
    path = Path(resume)
    problem = verify(path)
    if problem:
        raise CheckpointError(f"--resume={resume}: not a complete checkpoint ({problem})")
    return path


def resolve_resume(resume: str, out_dir: str | Path) -> Path | None:
    """``auto``: the newest complete checkpoint in ``out_dir`` (or none); ``none``; or a path.

    Rank 0 decides and broadcasts its choice (ranks may see different listings of
    a shared filesystem). It also checks that the checkpoint directory is writable,
    so a run fails at the start rather than at its first save, and deletes
    leftovers of an interrupted pruning.
    """
    root = Path(out_dir) / "checkpoints"

    def decide() -> str | None:
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(f"checkpoint directory {root} is not writable ({e})") from None
        for trash in root.glob(TRASH + "*"):
            log.info("removing %s (an interrupted deletion of an old checkpoint)", trash)
            shutil.rmtree(trash, ignore_errors=True)
        choice = _choose(resume, out_dir)
        return None if choice is None else str(choice)

    choice = _on_main(decide, "resume")
    return None if choice is None else Path(choice)


class _Writer(FileSystemWriter):
    """DCP's file writer (one file per rank, fsync'd) with the ``ckpt_write`` fault point."""

    def __init__(self, path: Path, step: int):
        super().__init__(str(path))
        self.step = step

    def write_data(self, plan, planner):
        faults.point("ckpt_write", self.step, path=self.path)
        return super().write_data(plan, planner)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _discard(path: Path, step: int | None = None) -> None:
    """Delete a checkpoint directory: rename it out of sight (atomic), then delete."""
    trash = path.with_name(f"{TRASH}{path.name}.{os.getpid()}")
    os.replace(path, trash)
    faults.point("ckpt_prune", step)
    shutil.rmtree(trash)


def _failure(error: BaseException) -> str:
    """The root cause of a failed DCP save, e.g. "rank 1: OSError: [Errno 28] ..."."""
    if isinstance(error, CheckpointException) and error.failures:
        rank, (exc, _) = next(iter(sorted(error.failures.items())))
        return f"rank {rank}: {type(exc).__name__}: {exc}"
    return f"{type(error).__name__}: {error}"


def save(out_dir: str | Path, step: int, state: dict[str, Any], keep: int,
         files: dict[str, str] | None = None) -> Path:
    """Save ``state`` collectively, plus small text ``files`` (e.g. config.json);
    commit it with the COMPLETE marker, written last; prune old ones."""
    root = Path(out_dir) / "checkpoints"
    path = root / f"step_{step:08d}"

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists():  # an interrupted save of this step (or one a resumed run replaces)
            _discard(path)

    _on_main(prepare, f"could not prepare checkpoint directory {path}")
    try:
        dcp.save(state, storage_writer=_Writer(path, step), no_dist=_no_dist())
    except (Exception, CheckpointException) as e:  # DCP raises the first failing rank's error on every rank
        if _rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
        previous = [p for p in checkpoint_dirs(out_dir) if p != path]
        kept = (f"the newest complete checkpoint {previous[-1]} is untouched and --resume=auto continues from it"
                if previous else "there is no earlier complete checkpoint")
        raise CheckpointError(f"could not write checkpoint {path} ({_failure(e)}); {kept}") from e
    faults.point("ckpt_before_complete", step)

    def commit() -> None:
        for name, text in (files or {}).items():
            _write_atomic(path / name, text)
        _write_atomic(path / COMPLETE, json.dumps({"step": step, "world_size": _world()}))
        fsync_dir(path)
        log.info("committed checkpoint %s", path)

    _on_main(commit, f"could not commit checkpoint {path}")
    if _rank() == 0 and keep > 0:
        for old in checkpoint_dirs(out_dir)[:-keep]:
            try:
                _discard(old, step)
            except OSError as e:
                log.warning("could not delete old checkpoint %s: %s", old, e)
    if _world() > 1:
        dist.barrier()  # leave together (a broadcast as the last collective can race the exit)
    return path


def load(path: str | Path, state: dict[str, Any], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """Fill ``state`` in place from a checkpoint (resharding DTensors as needed).

    Keys of ``state`` absent from the checkpoint are an error, except
    ``rng.rank<k>`` entries, which are dropped when the world size grew, and the
    ``optional`` keys of ``train`` (added after the checkpoint was written).
    """
    path = Path(path)
    stored = read_keys(path)
    for section, keys in (("rng", list(state.get("rng", {}))), ("train", optional)):
        for key in keys:
            if f"{section}.{key}" not in stored:
                state.get(section, {}).pop(key, None)
    dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(), no_dist=_no_dist())
    return state


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, allowed) differences between a checkpoint's config and this run's,
    each as ``"key: old -> new"``. Fields only one side has (added or removed in
    another version of flm) are allowed."""
    old, new = _flatten(stored), _flatten(current)
    refused, allowed = [], []
    for key in sorted(old.keys() | new.keys()):
        if key in old and key in new and old[key] == new[key]:
            continue
        before, after = (repr(side[key]) if key in side else "(absent)" for side in (old, new))
        both = key in old and key in new
        (refused if both and key.startswith(REFUSED) else allowed).append(f"{key}: {before} -> {after}")
    return refused, allowed


def dataset_identity(data_path: str | Path) -> dict[str, Any]:
    """What a checkpoint records of its dataset: the tokenizer's sha256 and the vocabulary size."""
    from flm.data import load_manifest

    manifest = load_manifest(data_path)
    return {"tokenizer_sha256": manifest["tokenizer"]["sha256"], "vocab_size": manifest["vocab_size"]}


class TrainState:
    """Everything a run needs to continue exactly, as one DCP state dict.

    ``modules`` holds every trainable module (the model, and for distillation
    the loss weighting) so that optimizer state is keyed by stable names.
    Small values (step, scheduler, data position, config, provenance, dataset
    identity, and the JSON state of each of ``counters``) are stored as JSON
    strings, so their shape never depends on the world size. ``counters`` maps
    names to objects with ``state_dict()`` / ``load_state_dict()`` whose state
    is the same on every rank (e.g. ``flm.guard.StepGuard``, ``flm.metrics.LossWindow``).
    """

    _FIXED = ("step", "scheduler", "data", "config", "provenance")

    def __init__(self, out_dir: str | Path, modules: "torch.nn.ModuleDict", optimizer, scheduler, ema,
                 loader, config_json: str, provenance: dict[str, Any] | None = None,
                 dataset: dict[str, Any] | None = None, counters: dict[str, Any] | None = None):
        self.out_dir, self.modules, self.optimizer = Path(out_dir), modules, optimizer
        self.scheduler, self.ema, self.loader = scheduler, ema, loader
        self.config_json, self.provenance = config_json, provenance or {}
        self.dataset, self.counters = dataset or {}, counters or {}

    def _arrays(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.modules, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, "ema": self.ema.state_dict(),
                "rng": {f"rank{_rank()}": rng_state()}}

    def state_dict(self, step: int) -> dict[str, Any]:
        return {**self._arrays(), "train": {
            "step": step, "scheduler": json.dumps(self.scheduler.state_dict()),
            "data": json.dumps(self.loader.state_dict()), "config": self.config_json,
            "provenance": json.dumps(self.provenance, sort_keys=True),
            "dataset": json.dumps(self.dataset, sort_keys=True),
            **{name: json.dumps(obj.state_dict()) for name, obj in self.counters.items()}}}

    def save(self, step: int, keep: int) -> Path:
        return save(self.out_dir, step, self.state_dict(step), keep, files={"config.json": self.config_json})

    def check(self, path: Path) -> None:
        """Refuse ``path`` if it was trained on another model, objective, data or teacher;
        log the settings that changed harmlessly."""
        stored = read_keys(path)
        small = {k: "" for k in ("config", "provenance", "dataset") if f"train.{k}" in stored}
        load(path, {"train": small})
        provenance = json.loads(small["provenance"])
        if provenance != self.provenance:
            raise CheckpointError(
                f"{path} was trained from {provenance or 'no teacher'}, but this run uses "
                f"{self.provenance or 'no teacher'}; point --resume elsewhere or use a new out_dir")
        refused, allowed = config_changes(json.loads(small["config"]), json.loads(self.config_json))
        data = json.loads(small.get("dataset", "{}"))
        sha, own = data.get("tokenizer_sha256"), self.dataset.get("tokenizer_sha256")
        if sha and own and sha != own:
            refused.append(f"dataset tokenizer sha256: {sha[:16]}... -> {own[:16]}...")
        if refused:
            raise CheckpointError(
                f"cannot resume from {path}: this run changes what it was trained on:\n  "
                + "\n  ".join(refused)
                + "\nrestore these settings, or start afresh with a new out_dir (or --resume=none)")
        if allowed:
            log.info("resuming %s with changed settings: %s", path.name, "; ".join(allowed))

    def restore(self, path: Path | None) -> int:
        """Load ``path`` (if any) into the live objects; returns the step to continue from."""
        if path is None:
            return 0
        from torch.distributed.checkpoint.state_dict import set_state_dict

        self.check(path)
        template = {**self._arrays(), "train": {k: "" for k in (*self._FIXED, *self.counters)}}
        state = load(path, template, optional=tuple(self.counters))
        # This run's optimizer settings (lr, betas, weight decay) win over the stored ones,
        # so that an allowed change of them takes effect; unchanged, they are the same values.
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        base_lrs = list(self.scheduler.base_lrs)
        set_state_dict(self.modules, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        for group, own in zip(self.optimizer.param_groups, settings):
            group.update(own)
        self.ema.load_state_dict(state["ema"])
        self.scheduler.load_state_dict(json.loads(state["train"]["scheduler"]))
        self.scheduler.base_lrs = base_lrs
        lrs = [b * f(self.scheduler.last_epoch) for b, f in zip(base_lrs, self.scheduler.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs
        self.loader.load_state_dict(json.loads(state["train"]["data"]))
        for value in state["rng"].values():
            set_rng_state(value)
        for name, obj in self.counters.items():
            if name in state["train"]:
                obj.load_state_dict(json.loads(state["train"][name]))
        step = int(state["train"]["step"])
        log.info("resumed from %s (step %d)", path, step)
        return step
