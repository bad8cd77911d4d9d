"""A larger FLM teacher for 4 nodes x 8 GPUs (HSDP: replicate across nodes, shard within).

    torchrun --nnodes 4 --nproc_per_node 8 --node_rank $NODE_RANK \
        --rdzv_backend c10d --rdzv_endpoint $MASTER_HOST:29500 --rdzv_id owt_large \
        run/train.py --config configs/owt_large.py

DiT: 24 blocks, hidden 2048, 16 heads, time-conditioning 256; V = 50258 (GPT-2 + padding id, --tokenizer gpt2), L = 1024.
Not a paper model; it keeps the released DiT's choices (dropout 0.1 as in every
released model size, attention logits soft-capped at 50, raw t into the time
embedding: model.time_scale=1).
Parameters: 1.491B (1.284B in blocks, 53.5M per block; 103M each for W_in and the
output layer). Training FLOPs: 8.47 GFLOP per token (6N + attention).

Memory per GPU, GiB (tools/memplan.py): 4 node(s) x 8 GPUs, micro-batch 16 x 1,
  checkpointing selective:
  before the step: params 0.69, optimizer 1.39, ema 0.69
  peak 21.91 (budget 70) in micro-batch 1/1 (backward): the above + activations 17.43, temporaries 1.70
  largest micro-batch within 70: 16 (all of the per-GPU batch), peak 21.91
Checkpointing off / full: 44.1 / 8.2 GiB. Regenerate with `python tools/memplan.py configs/owt_large.py`.
"""

from flm.config import Config, DataConfig, DistConfig, ModelConfig, OptimConfig

config = Config(
    objective="flm",
    out_dir="runs/owt_large",
    steps=500_000,
    batch_size=512,
    grad_accum=1,
    log_every=50,
    eval_every=5000,
    eval_batches=8,
    sample_every=10000,
    sample_steps=[8, 64, 1024],
    ckpt_every=2500,
    keep_checkpoints=3,
    model=ModelConfig(vocab_size=50258, seq_len=1024, dim=2048, n_layers=24, n_heads=16, cond_dim=256,
                      dropout=0.1, attn_softcap=50.0, time_scale=1.0),
    data=DataConfig(path="data/owt/tokens", num_workers=4),
    optim=OptimConfig(lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=2500,
                      schedule="constant", grad_clip=1.0, ema_decay=0.9999),
    dist=DistConfig(replicate=-1, activation_checkpointing="selective", mixed_precision="bf16"),
)
