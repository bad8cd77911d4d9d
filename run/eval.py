"""Evaluate checkpoints at several step counts: Gen PPL, entropy, MAUVE, distinct-n, speed.

    python run/eval.py --checkpoints runs/tiny/checkpoints/step_00000300,runs/fmlm/model.pt:fmlm_stage2 \
        --steps 1,2,4,8,64 --num_samples 64 --reference validation --out runs/eval/tiny
    torchrun --nproc_per_node 8 run/eval.py --checkpoints ... --num_samples 1024 --out ...

Every option is an argument of :func:`flm.eval.harness.evaluate`, which documents
them, the rows, the outputs and how ranks share the work.
"""

from __future__ import annotations

import fire

from flm.eval.harness import EvalArgumentError, evaluate


def main(**kwargs) -> None:
    try:
        evaluate(**kwargs)
    except EvalArgumentError as error:
        raise SystemExit(f"run/eval.py: {error}") from None


main.__doc__ = evaluate.__doc__

if __name__ == "__main__":
    fire.Fire(main)
