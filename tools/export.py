"""Consolidate a sharded DCP checkpoint into one file for sampling on one machine.

    python tools/export.py runs/tiny/checkpoints/step_00000300 runs/tiny/tiny.pt
    python tools/export.py CKPT model.safetensors --which model   # raw, not EMA, weights

The file holds the run config and full tensors; ``.pt`` files load with
``torch.load(weights_only=True)``, ``.safetensors`` needs the safetensors package.
"""

import fire

from flm.loading import export


def main(checkpoint: str, out: str, which: str = "ema") -> None:
    """Export ``which`` ("ema" or "model") weights of ``checkpoint`` to ``out``."""
    if which not in ("ema", "model"):
        raise SystemExit(f"--which={which!r}: expected ema or model")
    path = export(checkpoint, out, which)
    print(f"wrote {path}")


if __name__ == "__main__":
    fire.Fire(main)
