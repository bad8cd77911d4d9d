"""The README's CPU default: a tiny FLM on the embedded Shakespeare corpus.

Trains in a few minutes on 2 CPU cores and visibly learns (validation loss
falls well below its starting value of log V). The backbone keeps this project's
original defaults (t scaled by 1000 in the time embedding, no attention soft-cap, no
dropout), with which the README's tiny figures were made; the paper configs
(lm1b_small.py, owt_small.py) use the released ones (docs/fidelity.md):

    python run/train.py --config configs/tiny.py
"""

from flm.config import Config, DataConfig, DistConfig, ModelConfig, OptimConfig

config = Config(
    objective="flm",
    out_dir="runs/tiny",
    steps=600,
    batch_size=64,
    log_every=10,
    eval_every=200,
    eval_batches=4,
    sample_every=600,
    sample_steps=[1, 8, 64, 256],
    num_samples=2,
    ckpt_every=200,
    keep_checkpoints=2,
    model=ModelConfig(vocab_size=1024, seq_len=64, dim=128, n_layers=4, n_heads=4, cond_dim=64),
    data=DataConfig(path="data/shakespeare/tokens", num_workers=1),
    optim=OptimConfig(lr=3e-3, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1,
                      grad_clip=1.0, ema_decay=0.99),
    dist=DistConfig(activation_checkpointing="off", mixed_precision="fp32"),
)
