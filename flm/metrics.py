"""Training metrics: TensorBoard on rank 0, console lines, throughput, MFU, memory."""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("flm")

# Dense bf16 tensor-core peak, FLOP/s, by substring of the CUDA device name.
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
              "4090": 165e12, "V100": 125e12}


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stdout, force=True,
                        format=f"%(asctime)s [r{rank}] %(message)s", datefmt="%H:%M:%S")


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of one accelerator, or None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16.items() if k in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Throughput:
    """Tokens/s, achieved FLOP/s and MFU over the steps since the last ``read``."""

    def __init__(self, flops_per_token: float, world_size: int, device: torch.device):
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak = peak_flops(device)
        self.reset()

    def reset(self) -> None:
        self.t0, self.tokens, self.steps = time.perf_counter(), 0, 0

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside training steps (evaluation, checkpoints) out of the rates."""
        self.t0 += seconds

    def add(self, global_tokens: int) -> None:
        self.tokens += global_tokens
        self.steps += 1

    def read(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = self.tokens / dt
        flops_per_device = tps * self.flops_per_token / self.world_size
        out = {"tokens_per_s": tps, "step_time_s": dt / max(self.steps, 1),
               "tflops_per_device": flops_per_device / 1e12}
        if self.peak:
            out["mfu"] = flops_per_device / self.peak
        self.reset()
        return out


class LossWindow:
    """Loss sums of the steps since the last log line: this rank's, reduced when read.

    ``loss`` holds the (optimised, reported) token sums, ``buckets`` the per-bucket
    sums and counts of :func:`flm.methods.base.loss_by_bucket`, ``steps`` how many
    steps were added. Its state is saved with checkpoints as global sums, so a run
    resumed between two log lines logs the same averages as an uninterrupted one.
    """

    def __init__(self, device: torch.device, buckets: int = 10):
        self.device = device
        self.loss = torch.zeros(2, dtype=torch.float64, device=device)
        self.buckets = torch.zeros(2, buckets, dtype=torch.float64, device=device)
        self.steps = 0

    def add(self, loss: torch.Tensor, buckets: torch.Tensor) -> None:
        self.loss += loss
        self.buckets += buckets
        self.steps += 1

    def _reduced(self) -> tuple[torch.Tensor, torch.Tensor]:
        from flm.distributed import all_reduce_sum

        flat = all_reduce_sum(torch.cat([self.loss, self.buckets.flatten()]), self.device).cpu()
        return flat[:2], flat[2:].reshape(self.buckets.shape)

    def read(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(loss sums, bucket sums and counts, steps) over all ranks since the last read; then reset."""
        loss, buckets = self._reduced()
        steps = self.steps
        self.loss.zero_()
        self.buckets.zero_()
        self.steps = 0
        return loss, buckets, steps

    def state_dict(self) -> dict:
        """Global sums (a collective: every rank calls it)."""
        loss, buckets = self._reduced()
        return {"loss": loss.tolist(), "buckets": buckets.tolist(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Rank 0 holds the restored global sums, the other ranks start from zero."""
        import torch.distributed as dist

        main = not dist.is_initialized() or dist.get_rank() == 0
        self.loss.copy_(torch.tensor(state["loss"], dtype=torch.float64) * main)
        self.buckets.copy_(torch.tensor(state["buckets"], dtype=torch.float64) * main)
        self.steps = int(state["steps"])


def truncate_jsonl(path: str | Path, step: int) -> int:
    """Drop the rows of ``path`` logged after ``step`` (by a run that was killed before
    its next checkpoint) and any torn last line; returns how many were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)
    return dropped


class Logger:
    """Scalars and text to TensorBoard (rank 0 only) and a console line.

    ``start`` is the step the run resumed from: rows of ``jsonl`` and TensorBoard
    events after it (written by a run that was killed before its next checkpoint)
    are dropped, so every step is logged once.
    """

    def __init__(self, log_dir: str | Path, enabled: bool, jsonl: str | Path | None = None, start: int = 0):
        self.writer, self.jsonl = None, None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=start + 1)
            if jsonl is not None:  # every scalar at full precision, one JSON object per line
                dropped = truncate_jsonl(jsonl, start)
                if dropped:
                    log.info("%s: dropped %d rows after step %d (logged by an interrupted run after its "
                             "last checkpoint)", jsonl, dropped, start)
                self.jsonl = open(jsonl, "a")

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}{k}", v, step)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **{f"{prefix}{k}": v for k, v in values.items()}}) + "\n")

    def text(self, step: int, tag: str, text: str) -> None:
        if self.writer is not None:
            # TensorBoard renders markdown; keep the sample's line breaks.
            self.writer.add_text(tag, "    " + text.replace("\n", "\n    "), step)

    def console(self, step: int, values: dict[str, float]) -> None:
        parts = [f"step {step}"] + [f"{k} {_fmt(v)}" for k, v in values.items()]
        log.info(" | ".join(parts))

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        if self.jsonl is not None:
            self.jsonl.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _fmt(v: float) -> str:
    if isinstance(v, int) or (abs(v) >= 100 and float(v).is_integer()):
        return f"{int(v)}"
    return f"{v:.4g}"
