"""Study 9, linearizing a softmax transformer (`experiments/linearize.py`).

    python -m experiments.linearize                                   # default: the CPU protocol
    python -m experiments.linearize --config=configs/studies/linearize.py:quick
    python -m experiments.linearize --config=configs/studies/linearize.py:full

The papers convert 125M to 70B-parameter Llama-style models with tens of millions of tokens
per stage (LoLCATs' released configs: window 64, feature maps of 64 per head, attention
transfer at 1e-2, LoRA rank 8 and alpha 16 on q, k, v, o at 1e-4, no weight decay; we train
LoRA at 1e-3, the small model's short budget). Here the teacher is a byte-level softmax transformer
trained from scratch on the Python standard library, so every size scales the model down and
keeps the methods' hyper-parameters where they do not depend on the model's size (window 64,
LoRA rank 8 and alpha 16 on q, k, v, o, MSE x 1000, the window factor's initial 0.1), with
one feature map of `feature_dim = head_dim` per head (Hedgehog's d' = d).

- "full" (a GPU or TPU): a 6-layer, width-512 teacher (8 heads of 64) trained on rows of
  1024 bytes for 20k steps of 32 rows; each conversion fine-tunes for 2000 steps of the same
  batch (65M bytes), half of them attention transfer for Hedgehog and LoLCATs.
- "default" (a 2-core CPU, about 15 minutes per seed): a 2-layer, width-128 teacher (4 heads
  of 32) on rows of 256 bytes, 1000 steps of 16 rows (4M bytes); 200 fine-tuning steps per
  conversion (0.8M bytes), 100 + 100 for the two-stage methods; 4 held-out batches (16k bytes)
  per perplexity. The estimate, from per-step CPU times measured on the quick machine (seconds
  per step: teacher 0.50; LoRA 0.28 elu swap, 0.34 Hedgehog, 0.53 LoLCATs, 0.54 Liger;
  attention transfer 0.32 Hedgehog, 0.37 LoLCATs) and about 60 s of compilation: 500 s for
  the teacher, 320 s for the conversions, 15 minutes in all.
- "quick" (the tests: under a minute): one layer of width 32, rows of 32 bytes, window 8, a
  few steps; the numbers mean nothing.
"""

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.size = size
    config.methods = ("elu_swap", "hedgehog", "lolcats", "liger")
    # The teacher: a Llama-style byte-level transformer (RoPE, SwiGLU, RMSNorm).
    config.width = 128
    config.num_layers = 2
    config.num_heads = 4
    config.length = 256
    config.batch_size = 16
    config.teacher_steps = 1000
    config.teacher_learning_rate = 3e-3
    # The conversions: the same bytes for every method (steps x batch_size x length).
    config.finetune_steps = 200
    config.distill_fraction = 0.5  # of the steps, attention transfer (Hedgehog, LoLCATs)
    config.distill_learning_rate = 1e-2  # LoLCATs' attention-transfer rate
    config.lora_learning_rate = 1e-3
    config.lora_rank = 8
    config.lora_alpha = 16.0
    config.window = 64
    config.feature_dim = 32
    config.eval_batches = 4
    if size == "quick":
        config.width = 32
        config.num_layers = 1
        config.num_heads = 2
        config.length = 32
        config.batch_size = 4
        config.teacher_steps = 20
        config.finetune_steps = 4
        config.window = 8
        config.feature_dim = 8
        config.lora_rank = 4
        config.eval_batches = 1
    elif size == "full":
        config.width = 512
        config.num_layers = 6
        config.num_heads = 8
        config.length = 1024
        config.batch_size = 32
        config.teacher_steps = 20_000
        config.teacher_learning_rate = 1e-3
        config.finetune_steps = 2000
        config.feature_dim = 64
        config.eval_batches = 16
    return config
