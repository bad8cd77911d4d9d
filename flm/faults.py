"""Fault injection for tests and ``tools/soak.py`` only: kill, hang, signal, fail or poison
a run at a named point, chosen by the environment variable ``FLM_FAULT``.

Never set it in a real run. Unset (always, outside tests), every hook below is one
test of an empty tuple, so the training loop pays nothing for it.

``FLM_FAULT`` holds one or more specs separated by ``;``::

    action@point[:step=S[,S...]][:rank=R]

``step`` (the 1-based step being trained, or the step a checkpoint is saved for)
and ``rank`` (the global rank) narrow where a spec fires; without them it fires at
every step and on every rank. Examples::

    FLM_FAULT="kill@ckpt_before_complete:step=6:rank=1"   # rank 1 dies before the COMPLETE marker
    FLM_FAULT="nan@loss:step=4,5"                        # non-finite loss on every rank at steps 4, 5
    FLM_FAULT="usr1@step:step=3:rank=0;hide@resume_listing:rank=1"

Points (where flm calls a hook):

==========================  ====================================================
``step``                    every training step, after backward, before the
                            ranks agree on skipping or stopping (flm.guard)
``loss``                    the optimised loss of every micro-batch (``nan``)
``ckpt_write``              each rank, as it starts writing its checkpoint files
``ckpt_before_complete``    each rank, after all files are written and before
                            rank 0 writes the ``COMPLETE`` marker
``ckpt_prune``              rank 0, after an old checkpoint was renamed to its
                            trash name and before it is deleted
``resume_listing``          a rank listing the checkpoints to resume from (``hide``)
==========================  ====================================================

Actions: ``kill`` (SIGKILL itself), ``term`` / ``usr1`` (send itself SIGTERM /
SIGUSR1), ``hang`` (sleep forever), ``enospc`` / ``eacces`` (raise the OSError a
full disk / a read-only directory raises), ``nan`` (poison a value), ``hide``
(see an empty checkpoint listing).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("flm")

ENV = "FLM_FAULT"
ACTIONS = ("kill", "term", "usr1", "hang", "enospc", "eacces", "nan", "hide")


@dataclass(frozen=True)
class Fault:
    action: str
    point: str
    steps: frozenset[int] | None = None
    rank: int | None = None

    def matches(self, point: str, step: int | None) -> bool:
        if self.point != point or (self.steps is not None and step not in self.steps):
            return False
        return self.rank is None or self.rank == int(os.environ.get("RANK", "0"))


def parse(text: str) -> tuple[Fault, ...]:
    """``FLM_FAULT`` text -> faults; malformed specs are errors (a test must not silently pass)."""
    faults = []
    for spec in filter(None, (s.strip() for s in text.split(";"))):
        head, *conditions = spec.split(":")
        action, _, point = head.partition("@")
        if action not in ACTIONS or not point:
            raise ValueError(f"{ENV}: {spec!r}: expected action@point with action in {ACTIONS}")
        steps, rank = None, None
        for cond in conditions:
            key, _, value = cond.partition("=")
            if key == "step":
                steps = frozenset(int(s) for s in value.split(","))
            elif key == "rank":
                rank = int(value)
            else:
                raise ValueError(f"{ENV}: {spec!r}: unknown condition {key!r} (expected step= or rank=)")
        faults.append(Fault(action, point, steps, rank))
    return tuple(faults)


_FAULTS = parse(os.environ.get(ENV, ""))


def _find(point: str, step: int | None, actions: tuple[str, ...]) -> str | None:
    for fault in _FAULTS:
        if fault.action in actions and fault.matches(point, step):
            return fault.action
    return None


def point(name: str, step: int | None = None, path: object = None) -> None:
    """Kill, signal, hang or raise here if ``FLM_FAULT`` says so."""
    if not _FAULTS:
        return
    action = _find(name, step, ("kill", "term", "usr1", "hang", "enospc", "eacces"))
    if action is None:
        return
    log.warning("%s: %s at %s (step %s, rank %s)", ENV, action, name, step, os.environ.get("RANK", "0"))
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action in ("term", "usr1"):
        os.kill(os.getpid(), signal.SIGTERM if action == "term" else signal.SIGUSR1)
    elif action == "hang":
        while True:
            time.sleep(3600)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    elif action == "eacces":
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def poison(name: str, step: int, value):
    """``value`` times NaN if ``FLM_FAULT`` has ``nan@name`` for this step, else ``value`` itself."""
    if not _FAULTS or _find(name, step, ("nan",)) is None:
        return value
    return value * float("nan")


def active(action: str, name: str) -> bool:
    """Whether ``FLM_FAULT`` has ``action@name`` for this rank (e.g. ``hide@resume_listing``)."""
    return bool(_FAULTS) and _find(name, None, (action,)) is not None
