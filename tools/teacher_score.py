"""A Gen-PPL-free quality proxy: score samples with the FLM teacher's own denoiser.

    python tools/teacher_score.py runs/tiny/checkpoints/step_00001500 \
        --samples runs/tiny/samples.jsonl,runs/tiny_distill2/samples.jsonl

For token sequences x (samples, or held-out windows as the data row), report
the teacher's denoising cross-entropy E_eps[-log softmax(D(x_g, t))[x]] at
times t near 1 (g = tau(t)), averaged over noise draws: the teacher finds
data-like sequences easy to denoise, so lower is more data-like. It needs no
external scorer; it is biased toward whatever the teacher itself prefers, so
read it beside the data row and the unigram entropy (degenerate repetitive
samples also score low).
"""

from __future__ import annotations

import json
from pathlib import Path

import fire
import torch
import torch.nn.functional as F

from flm.data import TokenDataset
from flm.eval.entropy import mean_entropy
from flm.flow import interpolate
from flm.sampling import load_sampler


@torch.no_grad()
def denoising_loss(model, tau, ids: torch.Tensor, t: float, draws: int, seed: int) -> float:
    """Mean over tokens and ``draws`` noises of -log softmax(D(x_g, t))[x], g = tau(t)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.tok_emb.num_embeddings
    times = torch.full((ids.shape[0],), t)
    total = 0.0
    for _ in range(draws):
        eps = torch.randn(*ids.shape, vocab, generator=gen)
        logits = model(interpolate(ids, eps, tau(times)), times)
        total += F.cross_entropy(logits.float().flatten(0, 1), ids.flatten()).item()
    return total / draws


def main(teacher: str, samples: str | tuple, times: str | tuple = "0.8,0.9", draws: int = 4,
         data_windows: int = 64, seed: int = 0) -> None:
    sampler = load_sampler(teacher)
    if sampler.kind != "flm":
        raise SystemExit(f"{teacher} is a {sampler.kind} checkpoint; the proxy needs the FLM teacher")
    model, tau, L = sampler.model, sampler.method.tau, sampler.seq_len
    ts = [float(x) for x in (times.split(",") if isinstance(times, str) else times)]
    groups: dict[str, torch.Tensor] = {}
    for path in (samples.split(",") if isinstance(samples, str) else samples):
        for row in map(json.loads, Path(path).read_text().splitlines()):
            key = f"{row['kind']} {row['steps']} step{'s' if row['steps'] > 1 else ''}"
            groups.setdefault(key, []).append(row["ids"])
    val = TokenDataset(sampler.config["data"]["path"], sampler.config["data"]["val_split"])
    stride = max(L, (val.num_tokens - L) // data_windows)
    groups["data (validation)"] = [val.read(i * stride, L).tolist() for i in range(data_windows)]
    print(f"teacher denoising loss (nats/token) at t in {ts}, {draws} noise draws; lower = more data-like")
    print(f"{'samples':28s} {'n':>4s} " + " ".join(f"t={t:<6}" for t in ts) + " entropy")
    for name, rows in groups.items():
        ids = torch.tensor(rows, dtype=torch.long)
        losses = [denoising_loss(model, tau, ids, t, draws, seed) for t in ts]
        print(f"{name:28s} {len(rows):4d} " + " ".join(f"{v:8.3f}" for v in losses)
              + f" {mean_entropy(rows):7.2f}")


if __name__ == "__main__":
    fire.Fire(main)
