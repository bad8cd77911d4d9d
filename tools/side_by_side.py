"""Complete one prompt with several models and step counts, side by side, with timings.

    python tools/side_by_side.py runs/tiny/checkpoints/step_00001500:64 \
        runs/tiny_distill2/checkpoints/step_00000300:1,4 --prompt "ROMEO:"

Each argument is ``CHECKPOINT[:STEPS]`` (steps comma-separated, default 64). The
prompt is held fixed at the start of every sample (:func:`flm.load`). Prints one
block per model and step count: the completion, its network evaluations and the
seconds it took.
"""

from __future__ import annotations

import fire

import flm
from flm.config import ConfigError, parse_int_list


def main(*checkpoints: str, prompt: str = "ROMEO:", num: int = 1, seed: int = 0, width: int = 400,
         device: str = "auto") -> None:
    if not checkpoints:
        raise SystemExit("give at least one CHECKPOINT[:STEPS]")
    for arg in checkpoints:
        path, _, steps = str(arg).partition(":")
        try:
            step_list = parse_int_list("steps", steps or "64")
        except ConfigError as error:
            raise SystemExit(f"{arg}: {error}") from None
        lm = flm.load(path, device)
        for steps_n in step_list if lm.sampler.any_steps else [lm.seq_len]:
            lm.generate(num=1, steps=steps_n, seed=seed, prompt=prompt)  # warm-up, not timed
            out = lm.generate(num=num, steps=steps_n, seed=seed, prompt=prompt)
            print(f"--- {lm.kind} {path} | {steps_n} steps, {out.nfe} network evaluations, "
                  f"{out.seconds:.3f}s for {num} sample(s)")
            for text in out.texts:
                print(text.strip().replace("\n", " / ")[:width])
        print()


if __name__ == "__main__":
    fire.Fire(main)
