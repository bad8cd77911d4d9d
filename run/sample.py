"""Generate text from a trained FLM, stage-1 flow map or FMLM checkpoint.

    python run/sample.py runs/tiny/checkpoints/step_00000300 --steps 1,8,64,256 --num 4
    python run/sample.py runs/tiny_fmlm/model.pt --steps 1 --num 16 --out samples.jsonl

Works on a sharded checkpoint directory (EMA weights) or a file written by
``tools/export.py``. The decoded text is printed; ``--out`` also writes one
JSON object per sample (steps, network evaluations, token ids, text).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import fire
import torch

from flm.data import Tokenizer
from flm.sampling import load_sampler


def main(checkpoint: str, steps: str | int | tuple = "1,8,64", num: int = 4, seed: int = 0,
         out: str | None = None, tokenizer: str | None = None, teacher: str | None = None,
         device: str = "cuda" if torch.cuda.is_available() else "cpu") -> None:
    """Sample ``num`` sequences at each step count in ``steps`` (comma-separated)."""
    step_list = [int(s) for s in (steps.split(",") if isinstance(steps, str) else
                                  (steps if isinstance(steps, (tuple, list)) else [steps]))]
    sampler = load_sampler(checkpoint, device, teacher=teacher)
    tok_path = tokenizer or sampler.config["data"]["path"]  # a tokenizer file or the dataset directory
    tok = Tokenizer.load(tok_path)
    if tok.vocab_size != sampler.vocab_size:
        raise SystemExit(f"tokenizer {tok_path} has {tok.vocab_size} tokens but the model has "
                         f"{sampler.vocab_size}; pass --tokenizer")
    rows = []
    for n in step_list:
        gen = torch.Generator(device=sampler.device).manual_seed(seed)
        t0 = time.perf_counter()
        ids, nfe = sampler.generate(num, n, gen)
        dt = time.perf_counter() - t0
        print(f"=== {sampler.kind}, {n} steps ({nfe} network evaluations, {dt / num:.3f}s per sample)")
        for row in ids.cpu().tolist():
            text = tok.decode(row)
            print(text.strip()[:2000], "\n---")
            rows.append({"kind": sampler.kind, "steps": n, "nfe": nfe, "ids": row, "text": text})
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {len(rows)} samples to {out}")


if __name__ == "__main__":
    fire.Fire(main)
