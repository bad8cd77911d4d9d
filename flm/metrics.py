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


class Logger:
    """Scalars and text to TensorBoard (rank 0 only) and a console line."""

    def __init__(self, log_dir: str | Path, enabled: bool, jsonl: str | Path | None = None):
        self.writer, self.jsonl = None, None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
            if jsonl is not None:  # every scalar at full precision, one JSON object per line
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
