"""Study 10, compute-matched comparison (`experiments/compute_matched.py`).

    python -m experiments.compute_matched                                  # default, CPU
    python -m experiments.compute_matched --config=configs/studies/compute_matched.py:quick
    python -m experiments.compute_matched --config=configs/studies/compute_matched.py:full

Sizes, against Languini's protocol (compute classes of 6 to 96 hours on one RTX 3090; GPT
"small", 12 layers of width 768 with 12 heads, batch 128 rows of 512 BPE tokens, Adam with
a cosine decay from 6e-4 to 1% of it and no gradient clipping (we keep seqjax's clipping at
norm 1), the steps set from the measured throughput):
- "full" (one GPU): Languini's smallest class, 6 accelerator-hours per mixer, at the GPT-small
  shape (width 768, 12 layers, heads of 64), batch 128 rows of 512 bytes (bytes, not BPE
  tokens: a row holds about a quarter of the text).
- "default" (a 2-core CPU, about 15 minutes per seed): six mixers of width 128 and 2 layers
  (about 0.5M parameters), 16 rows of 256 bytes per step, 90 seconds of training each, 5
  evaluations of 8 held-out batches.
- "quick" (the tests: under a minute): attention and the LSTM only, width 32, one layer,
  8 rows of 64 bytes, 4 seconds each; the numbers mean nothing.

`machine` is filled in from the machine that loads the config: wall-clock results are only
comparable on one machine, so it is part of the config (and its hash).
"""

import ml_collections

from experiments.compute_matched import machine


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.size = size
    config.machine = machine()
    config.mixers = ("attention", "lstm", "gla", "gated_delta_net", "mamba2", "hgrn2")
    # Heads of 32 (attention, LSTM) and 64 (GLA, HGRN2); Gated DeltaNet's keys are 0.75 d wide
    # (its paper's ratio) here and d / 2 in "full", Mamba-2 is twice as deep (no MLP): each
    # within 15% of attention's parameters.
    config.mixer_options = {
        "attention": {"num_heads": 4},
        "lstm": {"num_heads": 4},
        "gla": {"num_heads": 2},
        "gated_delta_net": {"num_heads": 2, "head_dim": 48},
        "mamba2": {"state_size": 64},
        "hgrn2": {"expand_ratio": 64},
    }
    config.width = 128
    config.num_layers = 2
    config.length = 256
    config.batch_size = 16
    config.budget_seconds = 90.0
    config.calibration_steps = 10
    config.num_evals = 5
    config.eval_batches = 8
    config.learning_rate = 2e-3
    config.warmup_fraction = 0.1
    config.final_fraction = 0.01  # Languini's cosine ends at 1% of the peak
    config.weight_decay = 0.1
    config.mesh = {"data": -1}
    if size == "quick":
        config.mixers = ("attention", "lstm")
        config.mixer_options = {"attention": {"num_heads": 2}, "lstm": {"num_heads": 2}}
        config.width, config.num_layers = 32, 1
        config.length, config.batch_size = 64, 8
        config.budget_seconds = 4.0
        config.num_evals = 2
        config.eval_batches = 2
    elif size == "full":
        config.mixer_options = {
            "attention": {"num_heads": 12},
            "lstm": {"num_heads": 12},
            "gla": {"num_heads": 6},
            "gated_delta_net": {"num_heads": 6, "head_dim": 64},
            "mamba2": {"state_size": 128},
            "hgrn2": {"expand_ratio": 128},
        }
        config.width, config.num_layers = 768, 12
        config.length, config.batch_size = 512, 128
        config.budget_seconds = 6 * 3600.0
        config.calibration_steps = 20
        config.num_evals = 10
        config.eval_batches = 32
        config.learning_rate = 6e-4
    return config
