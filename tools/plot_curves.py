"""Plot a run's training curves from its metrics.jsonl (needs matplotlib, in the eval extra).

    python tools/plot_curves.py runs/tiny --out runs/tiny/curve.png

Left: training and validation loss against step. Right: the loss by time bucket
(t for the FLM teacher, interval length t - s when distilling) at the last
logged step, which shows where along the flow the model has learned.
"""

from __future__ import annotations

import json
from pathlib import Path

import fire


def main(run_dir: str, out: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
    buckets = [r for r in rows if any(k.startswith(("loss_by_t/", "loss_by_interval/")) for k in r)]
    if not train:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no train/loss rows")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats / token)", title=f"{Path(run_dir).name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if buckets:
        for r in (buckets[0], buckets[len(buckets) // 2], buckets[-1]):
            items = sorted((float(k.rsplit("/", 1)[1][1:]), v) for k, v in r.items()
                           if k.startswith(("loss_by_t/", "loss_by_interval/")))
            bx.plot([k + 0.05 for k, _ in items], [v for _, v in items], "o-", label=f"step {r['step']}")
        name = "t" if any(k.startswith("loss_by_t/") for k in buckets[-1]) else "t - s"
        bx.set(xlabel=name, ylabel="loss", title=f"loss by {name} (bucket centres)")
        bx.grid(alpha=0.3)
        bx.legend()
    fig.tight_layout()
    out_path = Path(out or Path(run_dir) / "curves.png")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    fire.Fire(main)
