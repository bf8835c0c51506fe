"""The README's main job: a 2-layer DeltaNet learns multi-query associative recall (Zoology's
MQAR: 8 key-value pairs bound in a 64-token prompt, each queried once) on a CPU in a few
minutes, with evaluation on held-out examples (another seed) and checkpoints.

    python -m experiments.train --config=configs/mqar_delta_net.py

Rerunning resumes from the last checkpoint in `runs/mqar_delta_net`.
"""

from seqjax.train.config import default_config


def get_config():
    config = default_config()
    config.data.task = "mqar"
    config.data.options = {"vocab_size": 256, "length": 64, "num_kv_pairs": 8, "seed": 0}
    config.data.eval_options = {"seed": 1}
    config.data.length = 64
    config.data.batch_size = 32
    config.model.width = 64
    config.model.layers = ("delta_net", "delta_net")
    config.model.mixer_options = {"delta_net": {"num_heads": 2}}
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 50
    config.train.steps = 800
    config.train.log_every = 20
    config.train.eval_every = 200
    config.train.checkpoint_every = 200
    return config
