"""Study 6, in-context language learning on RegBench (`experiments/regbench.py`).

    python -m experiments.regbench                                # default: CPU, ~15 min a seed
    python -m experiments.regbench --config=configs/studies/regbench.py:quick
    python -m experiments.regbench --config=configs/studies/regbench.py:full

"full" is the paper's protocol (seq_icl `configs/experiment/dfa/base.yaml`, `icl_dfa.yaml`):
5000 training automata with one prompt each, 200 epochs at batch 32 (31,250 steps), AdamW at
5e-4 with weight decay 0.1, warmup over 10% of training and cosine decay, whole prompts (the
longest can have 949 tokens), 1024 test prompts of 250 held-out automata; the paper's models are
about d = 128-256, 2-8 layers, tuned per architecture, where one shared 4-layer d = 128 stack
is used here.

"default" shrinks it to about 15 minutes a seed on a 2-core CPU (12 models of about a minute
each, a fifth of it compilation): d = 64, 2 layers, prompts cut to their first 256 tokens
(about 10 strings; prompts average 387 tokens and 92% are cut), batch 8, 300 steps (2400
prompts, half an epoch of the 5000 automata: about 0.2% of the paper's training tokens), 256
test prompts. The models are far from converged, so this compares architectures at a small,
equal budget, not at the paper's.
"quick" runs the LSTM with and without n-gram heads for a few steps: its numbers mean nothing.
"""

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.size = size
    config.models = ("attention", "linear_attention", "gla", "delta_net", "ssd", "lstm")
    config.ngram_heads = (False, True)
    config.ngram_orders = (1, 2, 3)
    config.width = 64
    config.depth = 2
    config.mixer_options = {
        "attention": {"num_heads": 2},
        "based": {"num_heads": 2, "feature_dim": 16},
        "gla": {"num_heads": 2},
        "delta_net": {"num_heads": 2},
        "mamba2": {"head_dim": 32, "state_size": 64},
        "lstm": {},
    }
    config.length = 256
    config.batch_size = 8
    config.train_steps = 300
    config.learning_rate = 1e-3
    config.weight_decay = 0.1
    config.num_dfas = 5000
    config.num_heldout_dfas = 500
    config.eval_examples = 256
    if size == "quick":
        config.models = ("lstm",)  # each model is two compilations: ~20 s of one core
        config.width, config.depth = 32, 1
        config.length, config.batch_size, config.train_steps = 64, 4, 6
        config.num_dfas, config.num_heldout_dfas, config.eval_examples = 16, 4, 4
    elif size == "full":
        config.width, config.depth = 128, 4
        config.mixer_options = {
            "attention": {"num_heads": 2},
            "based": {"num_heads": 4, "feature_dim": 16},
            "gla": {"num_heads": 2},
            "delta_net": {"num_heads": 2},
            "mamba2": {"head_dim": 64},
            "lstm": {},
        }
        config.length = 1024
        config.batch_size = 32
        config.train_steps = 31_250
        config.learning_rate = 5e-4
        config.eval_examples = 1024
    return config
