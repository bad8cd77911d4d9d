"""Per-GPU memory plan of training configs, computed by running their real step on fake tensors.

    python tools/memplan.py configs/owt_small_distill2.py                 # breakdown, the config's layout
    python tools/memplan.py configs/owt_small_distill2.py --micro_batch=32 --ac=full
    python tools/memplan.py configs/owt_large_distill1.py --search        # largest micro-batch that fits
    python tools/memplan.py configs/lm1b_small.py configs/owt_*.py --table --search --modes
    python tools/memplan.py configs/tiny.py --measure                     # real CPU step, 2 processes

The layout is the one the config documents in its ``torchrun`` line (``--nnodes``
x ``--nproc_per_node``; plain ``python`` is one process) unless ``--nodes`` /
``--gpus_per_node`` say otherwise. "Fits" means a peak within ``--budget_gib``
(default 70 GiB of an 80 GB card). See :mod:`flm.memplan` for what is counted.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import fire

from flm import memplan
from flm.config import load_config
from flm.memplan import GIB, Mem

warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
MODES = ("off", "selective", "full")


def _g(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f}"


def _row(p: memplan.Plan, best: memplan.Plan | None, modes: dict[str, memplan.Plan] | None,
         budget: float) -> str:
    persistent = sum(v for k, v in p.persistent.items() if k != Mem.FROZEN.value)
    frozen = p.persistent.get(Mem.FROZEN.value, 0)
    frozen_cell = f"{_g(frozen)} ({p.frozen_placement})" if p.frozen_placement else "-"
    fits = "" if p.fits(budget) else " **(over)**"
    cells = [f"`{Path(p.config).name}`", p.objective, f"{p.nodes} x {p.gpus_per_node}",
             f"{p.micro_batch} x {p.grad_accum}", p.activation_checkpointing, _g(persistent), frozen_cell,
             _g(p.at_peak.get(Mem.VOCAB.value, 0)), f"**{_g(p.peak)}**{fits}"]
    if best is not None or modes is not None:
        cells.append(f"{best.micro_batch} ({_g(best.peak)})" if best else "none")
    if modes is not None:
        cells.append(" / ".join(_g(modes[m].peak) for m in MODES))
    return "| " + " | ".join(cells) + " |"


def main(*configs: str, nodes: int | None = None, gpus_per_node: int | None = None, micro_batch: int | None = None,
         ac: str | None = None, frozen_placement: str | None = None, search: bool = False, modes: bool = False,
         table: bool = False, brief: bool = False, budget_gib: float = memplan.BUDGET_GIB,
         json_out: str | None = None, measure: bool = False) -> None:
    """Plan each config file; ``--table`` prints one markdown row per config instead of breakdowns.

    --search: also the largest micro-batch within --budget_gib (at the config's checkpointing).
    --modes: also the peak under each activation-checkpointing mode (off / selective / full).
    --brief: a few lines per config (as in the configs' docstrings).
    --measure: run the real step on 2 CPU processes and compare its measured peak (small configs only).
    """
    logging.getLogger("flm").setLevel(logging.WARNING)
    if not configs:
        raise SystemExit("give one or more config files, e.g. configs/owt_small.py")
    rows, plans = [], []
    for path in configs:
        start = time.perf_counter()
        cfg = load_config(path)
        n, g = memplan.intended_layout(path)
        n, g = nodes or n, gpus_per_node or g
        kw = dict(activation_checkpointing=ac, frozen_placement=frozen_placement, configs_dir=Path(path).parent,
                  name=path)
        p = memplan.plan(cfg, n, g, micro_batch=micro_batch, **kw)
        plans.append(p)
        best = memplan.largest_fitting(cfg, n, g, budget_gib, **kw) if search else None
        by_mode = None
        if modes:
            by_mode = {m: memplan.plan(cfg, n, g, micro_batch=p.micro_batch,
                                       **(kw | {"activation_checkpointing": m})) for m in MODES}
        seconds = time.perf_counter() - start
        if table:
            rows.append(_row(p, best, by_mode, budget_gib))
        elif brief:
            print(f"{path}:\n{p.summary(budget_gib, best)}\n")
        else:
            print(p.report())
            if search:
                print(f"  largest micro-batch within {budget_gib} GiB: "
                      + (f"{best.micro_batch} x {best.grad_accum} accumulation, peak {_g(best.peak)} GiB"
                         if best else "none"))
            if by_mode:
                print("  peak by activation checkpointing: "
                      + ", ".join(f"{m} {_g(q.peak)} GiB" for m, q in by_mode.items()))
            if measure:
                real = memplan.measure_world([(path, {})], 2, configs_dir=Path(path).parent)[0]
                q = memplan.plan(cfg, 1, 2, configs_dir=Path(path).parent)
                print(f"  on 2 CPU processes: planned {q.peak / 2**20:.1f} MiB, measured {real['peak'] / 2**20:.1f} "
                      f"MiB ({q.peak / real['peak']:.3f}x)")
            print(f"  ({seconds:.1f} s)\n")
    if table:
        head = ["config", "objective", "nodes x GPUs", "micro x accum", "checkpointing",
                "params + AdamW + EMA, GiB", "frozen nets, GiB", "(., L, V) at peak, GiB", "peak, GiB"]
        if search or modes:
            head.append(f"largest micro-batch within {budget_gib:g} GiB (peak)")
        if modes:
            head.append("peak with checkpointing off / selective / full, GiB")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        print("\n".join(rows))
    if json_out:
        Path(json_out).write_text(json.dumps([p.to_dict() for p in plans], indent=1))


if __name__ == "__main__":
    fire.Fire(main)
