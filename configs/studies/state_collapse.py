"""Study 4, state collapse and length extrapolation (`experiments/state_collapse.py`).

    python -m experiments.state_collapse                                  # default, CPU
    python -m experiments.state_collapse --config=configs/studies/state_collapse.py:quick
    python -m experiments.state_collapse --config=configs/studies/state_collapse.py:full

Sizes, against the paper's protocol (Chen et al., "Stuffed Mamba", 2024: Mamba-2 models of
130M-1.3B parameters, head_dim 64, state size 128 in the official checkpoints and smaller in
their controlled runs, trained on 512-8K token contexts, loss by position to 16x the training
length and beyond; 5-digit passkeys at depths 0-1 over contexts up to 256K):
- "full" (a GPU or TPU): width 768, 24 layers (Mamba-2 130M's shape over our 256 bytes),
  state sizes 16 and 128, trained at 2048 tokens for 20k steps of 32 rows; loss and state
  norms to 32768 tokens (16x) over 6 test files (the standard library's test split has 7 that
  long); passkey models trained at 2048 tokens, tested at 2K-32K with 100 keys per cell.
- "default" (a 2-core CPU, about 12 minutes per seed, estimated, not run: see below): width
  64, 2 layers, head_dim 32 (4 heads), state sizes 8 and 64 (1024 and 8192 state floats per
  layer); text trained at 128 bytes for 800 steps of 16 rows, tested to 2048 bytes (16x) on 8
  files; passkey models trained at 128 tokens (key at depth 0.5) for 1000 steps, tested at
  128-1024 tokens and depths 0-1 with 32 keys per cell. At this budget the models are far from
  converged (a 300-step passkey probe got a third of the digits right and no whole key); what
  it can show is whether the larger state's loss and state norm grow more past the training
  length, and whether retrieval degrades with length.
  The estimate: CPU time per train step (a jitted gradient at these shapes, measured on this
  2-core machine under load) 0.11 s at N = 8 and 0.18 s at N = 64, plus 15% for the data and
  the update: 800 + 1000 steps of both models about 600 s; compiling 4 training runs about
  80 s, 6 cached passes and 8 passkey lengths about 35 s.
- "quick" (the tests: about a minute): width 16, 1 layer, head_dim 8, state sizes 4 and 16,
  10 steps of 8 rows at 32 bytes, tested to 128 on 2 files; passkey at 112 tokens, tested at
  112 and 224, depths 0, 0.5 and 1, 2 keys per cell; the numbers mean nothing.
"""

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.size = size
    config.state_sizes = (8, 64)
    config.width = 64
    config.num_layers = 2
    config.head_dim = 32
    config.mitigations = ("none", "decay_clamp", "state_norm")
    # The decay clamp lets no token keep more than 1/e of its weight after this many training
    # lengths (`experiments/state_collapse.py`).
    config.clamp_memory = 1.0
    config.train_length = 128
    config.test_length = 2048
    config.lm_steps = 800
    config.batch_size = 16
    config.learning_rate = 2e-3
    config.eval_batches = 4
    config.eval_rows = 8
    config.passkey_train_length = 128
    config.passkey_train_depth = 0.5
    config.passkey_steps = 1000
    config.passkey_lengths = (128, 256, 512, 1024)
    config.passkey_depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    config.passkey_examples = 32
    config.mesh = {"data": -1}
    if size == "quick":
        config.state_sizes = (4, 16)
        config.width, config.num_layers, config.head_dim = 16, 1, 8
        config.train_length, config.test_length = 32, 128
        config.lm_steps = config.passkey_steps = 10
        config.batch_size, config.eval_batches, config.eval_rows = 8, 1, 2
        config.passkey_train_length = 112
        config.passkey_lengths = (112, 224)
        config.passkey_depths = (0.0, 0.5, 1.0)
        config.passkey_examples = 2
    elif size == "full":
        config.state_sizes = (16, 128)
        config.width, config.num_layers, config.head_dim = 768, 24, 64
        config.train_length, config.test_length = 2048, 32768
        config.lm_steps = config.passkey_steps = 20_000
        config.batch_size, config.eval_batches, config.eval_rows = 32, 16, 6
        config.learning_rate = 3e-4
        config.passkey_train_length = 2048
        config.passkey_lengths = (2048, 4096, 8192, 16384, 32768)
        config.passkey_examples = 100
    return config
