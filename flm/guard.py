"""What keeps a long run safe between steps: pre-emption signals, non-finite steps, hangs.

One :class:`StepGuard` per run. At every step boundary the ranks agree, in one
all-reduce (MAX) of three flags, on two things:

* **Stop?** SIGTERM or SIGUSR1 (what schedulers send before pre-empting or at the
  time limit) only sets a flag in the process that received it; the signal may
  reach some ranks and not others. Once any rank has it, every rank finishes the
  current step, the loop writes one checkpoint and the process exits with
  ``EXIT_PREEMPTED`` (75, ``EX_TEMPFAIL``: relaunch to continue).
* **Skip?** If the loss of any rank or the (global) gradient norm is not finite,
  every rank skips the update: no optimizer step, no scheduler step, no EMA
  update, and the step's loss is left out of the logged averages. The step
  counter and the data position do advance (the bad batch is dropped, not
  retried: it would fail again with the same noise). Skips are counted
  (``train/skipped_steps``); after ``max_bad_steps`` consecutive ones the run
  stops with ``EXIT_DIVERGED`` (76) and a message naming the last checkpoint,
  which holds the last good weights.

The guard also knows where the loop is (:meth:`at`: step and operation). Used as
``with guard:`` around the loop, it re-raises a failed or timed-out collective as
:class:`CollectiveError` naming the rank, step and operation (other errors get
that as a note), and a watchdog thread logs the same, with every thread's stack,
when one operation runs longer than the collective timeout: on a rank that is
stuck outside a collective, and on NCCL, whose timeouts abort the process
instead of raising.
"""

from __future__ import annotations

import faulthandler
import logging
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from flm import faults

log = logging.getLogger("flm")

EXIT_PREEMPTED = 75  # a signal asked the run to stop; it saved a checkpoint: relaunch to continue
EXIT_DIVERGED = 76  # max_bad_steps consecutive non-finite steps; the last checkpoint is the last good state

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_COMMS = re.compile(r"timed out|timeout|connection (closed|reset)|closed by peer|broken pipe|nccl|gloo",
                    re.IGNORECASE)


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names the rank, step and operation."""


class Diverged(SystemExit):
    """``max_bad_steps`` consecutive non-finite steps (exits with ``EXIT_DIVERGED``)."""


class StepGuard:
    def __init__(self, max_bad_steps: int, timeout_s: float, rank: int, device: torch.device,
                 out_dir: str | Path):
        self.max_bad_steps, self.timeout_s, self.rank = max_bad_steps, timeout_s, rank
        self.device, self.out_dir = device, Path(out_dir)
        self.signal: str | None = None  # the first stop signal this rank received
        self.stop = False  # every rank agreed to stop after this step
        self.skipped = 0  # steps skipped over the whole run
        self.consecutive = 0  # non-finite steps in a row
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        self._where: tuple[int, str, float] = (0, "start", time.monotonic())
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- signals ----

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = name
            # Only async-signal-safe work here: the loop logs it at the next step boundary.

    def close(self) -> None:
        """Restore the signal handlers that were installed before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    # ---- the per-step agreement ----

    def check(self, step: int, grad_norm: torch.Tensor, loss: torch.Tensor) -> bool:
        """Whether to apply this step's update; sets :attr:`stop`. One all-reduce, on every rank."""
        faults.point("step", step)
        self.at(step, "agreement all-reduce (stop / skip flags)")
        flags = torch.stack([torch.tensor(float(self.signal is not None), device=self.device),
                             (~torch.isfinite(loss).all()).float(),
                             (~torch.isfinite(grad_norm)).float().reshape(())])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, bad_loss, bad_norm = (v > 0 for v in flags.tolist())
        if stop and not self.stop:
            log.warning("step %d: stop requested (%s on %s); saving a checkpoint and exiting with %d",
                        step, self.signal or "a signal", "this rank" if self.signal else "another rank",
                        EXIT_PREEMPTED)
        self.stop = self.stop or stop
        if not (bad_loss or bad_norm):
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        what = "loss" if bad_loss else "gradient norm"
        log.warning("step %d: non-finite %s; update skipped on every rank (%d in a row, %d in all)",
                    step, what, self.consecutive, self.skipped)
        if self.max_bad_steps > 0 and self.consecutive >= self.max_bad_steps:
            from flm.checkpoint import checkpoint_dirs

            last = checkpoint_dirs(self.out_dir)
            log.error("stopping: %d consecutive steps with a non-finite loss or gradient (steps %d-%d, "
                      "max_bad_steps=%d). The last good weights are in %s; lower optim.lr or inspect the data "
                      "before resuming from it.", self.consecutive, step - self.consecutive + 1, step,
                      self.max_bad_steps, last[-1] if last else "no checkpoint (none was written yet)")
            raise Diverged(EXIT_DIVERGED)
        return False

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])

    # ---- where the loop is: errors and hangs name the step and operation ----

    def at(self, step: int, op: str) -> None:
        """Record that this rank now runs ``op`` of ``step`` (cheap: one tuple)."""
        self._where = (step, op, time.monotonic())

    def describe(self) -> str:
        step, op, _ = self._where
        return f"rank {self.rank}, step {step}, {op}"

    def __enter__(self) -> StepGuard:
        self._thread = threading.Thread(target=self._watch, name="flm-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind, error, tb) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)  # gone before the interpreter shuts down
        if error is None or not isinstance(error, Exception):
            return
        message = str(error)
        if isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and _COMMS.search(message)):
            raise CollectiveError(
                f"{self.describe()}: a collective failed or timed out (dist.timeout_s={self.timeout_s:g}): "
                f"{message.strip()}") from error
        if hasattr(error, "add_note"):
            error.add_note(f"(in {self.describe()})")

    def _watch(self) -> None:
        period = max(0.5, min(10.0, self.timeout_s / 4))
        reported = None
        while not self._done.wait(period):
            step, op, since = self._where
            if (step, op, since) != reported and time.monotonic() - since > self.timeout_s:
                reported = (step, op, since)
                log.error("%s has not finished after %.0f s (dist.timeout_s=%g): a rank is stuck; stacks follow",
                          self.describe(), time.monotonic() - since, self.timeout_s)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
