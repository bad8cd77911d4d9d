"""Consolidate a sharded DCP checkpoint into one file for sampling on one machine.

    python tools/export.py runs/tiny/checkpoints/step_00000300 runs/tiny/tiny.pt
    python tools/export.py CKPT model.safetensors --which model   # raw, not EMA, weights

The file holds the run config and full tensors; ``.pt`` files load with
``torch.load(weights_only=True)``, ``.safetensors`` needs the safetensors package.
"""

import fire

from flm.loading import CheckpointError, export


def main(checkpoint: str, out: str, which: str = "ema") -> None:
    """Export ``which`` ("ema" or "model") weights of ``checkpoint`` to ``out``.

    The file is written beside ``out`` and renamed onto it, so after a failure
    (a full disk, a read-only directory) ``out`` is absent or still the old file.
    """
    if which not in ("ema", "model"):
        raise SystemExit(f"--which={which!r}: expected ema or model")
    try:
        path = export(checkpoint, out, which)
    except (CheckpointError, OSError) as error:
        raise SystemExit(f"export: error: {error}") from None
    print(f"wrote {path}")


if __name__ == "__main__":
    fire.Fire(main)
