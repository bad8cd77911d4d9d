"""The README's CPU default: a tiny FLM on the embedded Shakespeare corpus.

Trains in about 5 minutes on 2 CPU cores (1500 steps of 64 x 64 tokens, the budget
and settings of the study's teachers, configs/study/base.py). The budget matters
more than its size suggests: with 600 steps (this config until the study) the loss
stalls near 5.0 nats/token and the samples collapse onto frequent pieces ("the the
the", entropy 1.8 against 3.8 for the data); with 1500 steps and its slower cosine
decay the loss drops past 4 around step 250-300 and ends near 3.1, and the samples
keep the data's entropy. The backbone keeps this project's
original defaults (t scaled by 1000 in the time embedding, no attention soft-cap, no
dropout), with which the README's tiny figures were made; the paper configs
(lm1b_small.py, owt_small.py) use the released ones (docs/fidelity.md):

    python run/train.py --config configs/tiny.py
"""

from flm.config import Config, DataConfig, DistConfig, ModelConfig, OptimConfig

config = Config(
    objective="flm",
    out_dir="runs/tiny",
    steps=1500,
    batch_size=64,
    log_every=10,
    eval_every=500,
    eval_batches=4,
    sample_every=1500,
    sample_steps=[1, 8, 64, 256],
    num_samples=2,
    ckpt_every=500,
    keep_checkpoints=2,
    model=ModelConfig(vocab_size=1024, seq_len=64, dim=128, n_layers=4, n_heads=4, cond_dim=64),
    data=DataConfig(path="data/shakespeare/tokens", num_workers=1),
    optim=OptimConfig(lr=3e-3, warmup_steps=50, schedule="cosine", min_lr_ratio=0.1,
                      grad_clip=1.0, ema_decay=0.995),
    dist=DistConfig(activation_checkpointing="off", mixed_precision="fp32"),
)
