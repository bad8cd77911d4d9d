"""Generate text from a trained model of any method (FLM, stage-1 map, FMLM, MDLM, AR).

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

from flm.config import ConfigError, parse_int_list
from flm.data import Tokenizer
from flm.sampling import load_sampler


def main(checkpoint: str, steps: str | int | tuple = "1,8,64", num: int = 4, seed: int = 0,
         out: str | None = None, tokenizer: str | None = None, teacher: str | None = None,
         top_p: float | None = None, device: str = "cuda" if torch.cuda.is_available() else "cpu") -> None:
    """Sample ``num`` sequences at each step count in ``steps`` (comma-separated).

    ``teacher`` replaces the FLM teacher recorded in a stage-1 map; ``top_p``
    (AR only) samples from the nucleus of that probability mass. Methods with a
    fixed step count (AR) sample once, at their own count.
    """
    try:
        step_list = parse_int_list("steps", steps)
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    options = {} if top_p is None else {"top_p": float(top_p)}
    sampler = load_sampler(checkpoint, device, teacher=teacher, **options)
    if not sampler.any_steps:
        step_list = [sampler.seq_len]
    tok_path = tokenizer or Path(sampler.config["data"]["path"]) / "tokenizer.model"
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
