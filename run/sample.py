"""Generate text from a trained model of any method (FLM, stage-1 map, FMLM, MDLM, AR).

    python run/sample.py runs/tiny/checkpoints/step_00000300 --steps 1,8,64,256 --num 4
    python run/sample.py runs/tiny_fmlm/model.pt --steps 1,4 --prompt "ROMEO:" --out samples.jsonl

Works on a sharded checkpoint directory (EMA weights) or a file written by
``tools/export.py``; a thin command line over :func:`flm.load`. The decoded text
is printed; ``--out`` also writes one JSON object per sample (steps, network
evaluations, token ids, text).
"""

from __future__ import annotations

import json
from pathlib import Path

import fire
import torch

import flm
from flm.config import ConfigError, parse_int_list


def main(checkpoint: str, steps: str | int | tuple = "1,8,64", num: int = 4, seed: int = 0,
         out: str | None = None, prompt: str | None = None, suffix: str | None = None,
         tokenizer: str | None = None, teacher: str | None = None, top_p: float | None = None,
         device: str = "auto") -> None:
    """Sample ``num`` sequences at each step count in ``steps`` (comma-separated).

    ``prompt``/``suffix``: text held fixed at the start/end of every sample.
    ``tokenizer``: a tokenizer file or dataset directory (default: the training
    dataset's). ``teacher`` replaces the FLM teacher recorded in a stage-1 map;
    ``top_p`` (AR only) samples from the nucleus of that probability mass.
    Methods with a fixed step count (AR) sample once, at their own count.
    """
    try:
        step_list = parse_int_list("steps", steps)
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    options = {} if top_p is None else {"top_p": float(top_p)}
    try:
        lm = flm.load(checkpoint, device, tokenizer=tokenizer, teacher=teacher, **options)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"run/sample.py: {error}") from None
    if not lm.sampler.any_steps:
        step_list = [lm.seq_len]
    rows = []
    for n in step_list:
        result = lm.generate(num=num, steps=n, seed=seed, prompt=prompt, suffix=suffix)
        print(f"=== {lm.kind}, {n} steps ({result.nfe} network evaluations, {result.seconds / num:.3f}s per sample)")
        for ids, text in zip(result.ids.tolist(), result.texts):
            print(text.strip()[:2000], "\n---")
            rows.append({"kind": lm.kind, "steps": n, "nfe": result.nfe, "ids": ids, "text": text})
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {len(rows)} samples to {out}")


if __name__ == "__main__":
    fire.Fire(main)
