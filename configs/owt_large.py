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

Per-GPU memory plan (H100 80 GB; 32 GPUs; global batch 512 -> 16 sequences of
1024 tokens per GPU per step; shard group = the node's 8 GPUs):
  fp32 parameters / 8 ............................... 0.75 GB
  fp32 gradients / 8 ................................ 0.75 GB
  AdamW moments (2 x fp32) / 8 ...................... 1.50 GB
  EMA (fp32) / 8 .................................... 0.75 GB
  unsharded bf16 params in flight (root: W_in + output
    2 x 206 MB; 2 blocks x 107 MB incl. prefetch) ... 0.63 GB
  activations, selective checkpointing (matmul and
    attention outputs kept: ~10 d bf16 per token per
    block = 16384 x 2048 x 10 x 2 B x 24 blocks) .... 16.1 GB
  logits 16384 x 50258 (bf16 output, fp32 upcast and
    its gradient) ................................... 8.2 GB
  low-rank noise z (16384 x 2048 fp32) .............. 0.13 GB
  total ~29 GB (+ allocator slack). With dist.activation_checkpointing=full the
  activations drop to ~1.6 GB of block inputs + ~2.3 GB for one recomputed block.
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
