"""FLM teacher, DiT-small on OpenWebText (method.md section 4; the paper's setting).

12 blocks, hidden 768, 12 heads, time-conditioning 128; V = 50258 (GPT-2's
tokenizer plus one padding id, as released: pretokenize with --tokenizer gpt2), L = 1024, global batch 512,
AdamW (0.9, 0.999) lr 3e-4, no weight decay, constant after 2500 warmup steps,
clip 1.0, EMA 0.9999, bf16. As released (their configs/model/small.yaml and
models/dit.py): dropout 0.1 on the residual branches, attention logits soft-capped at
50, raw t into the sinusoidal time embedding (model.time_scale=1). 1M steps on 8 x H100
(method.md; the released script allows up to 1.5M):

    torchrun --nproc_per_node 8 run/train.py --config configs/owt_small.py

About 170M parameters of which 77M are the input and output matrices.

Memory per GPU, GiB (tools/memplan.py): 1 node(s) x 8 GPUs, micro-batch 64 x 1,
  checkpointing selective:
  before the step: params 0.08, optimizer 0.16, ema 0.08
  peak 15.20 (budget 70) in micro-batch 1/1 (backward): the above + activations 12.72, temporaries 2.15
  largest micro-batch within 70: 64 (all of the per-GPU batch), peak 15.20
Checkpointing off / full: 31.0 / 4.8 GiB.
"""

from flm.config import Config, DataConfig, DistConfig, ModelConfig, OptimConfig

config = Config(
    objective="flm",
    out_dir="runs/owt_small",
    steps=1_000_000,
    batch_size=512,
    grad_accum=1,  # 64 sequences of 1024 per H100; raise on smaller GPUs
    log_every=50,
    eval_every=5000,
    eval_batches=16,
    sample_every=10000,
    sample_steps=[8, 64, 1024],
    ckpt_every=5000,
    keep_checkpoints=3,
    model=ModelConfig(vocab_size=50258, seq_len=1024, dim=768, n_layers=12, n_heads=12, cond_dim=128,
                      dropout=0.1, attn_softcap=50.0, time_scale=1.0),
    data=DataConfig(path="data/owt/tokens", num_workers=4),
    optim=OptimConfig(lr=3e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=2500,
                      schedule="constant", grad_clip=1.0, ema_decay=0.9999),
    dist=DistConfig(replicate=1, activation_checkpointing="selective", mixed_precision="bf16"),
)
