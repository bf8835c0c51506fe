"""The tiny training run the loop tests share (a config file for `experiments.train`, and the
source of the in-process runs): one attention layer on short MQAR, 30 steps. The loop does not
depend on the mixer; attention is the quickest to compile. `--config=run_config.py:hybrid` is
a DeltaNet (with its short convolutions) and attention hybrid, 20 steps: the model the
sequence-parallel run trains."""

from seqjax.train.config import default_config


def get_config(variant: str = ""):
    config = default_config()
    config.data.options = {"vocab_size": 32, "length": 32, "num_kv_pairs": 4, "seed": 0}
    config.data.eval_options = {"seed": 1}
    config.data.length = 32
    config.data.batch_size = 8
    config.model.width = 32
    config.model.layers = ("attention",)
    config.model.mixer_options = {"attention": {"num_heads": 4}}
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 5
    config.train.steps = 30
    config.train.log_every = 1
    config.train.eval_every = 30
    config.train.eval_batches = 1
    config.train.checkpoint_every = 5
    if variant == "hybrid":
        config.model.layers = ("delta_net", "attention")
        config.model.mixer_options = {"delta_net": {"num_heads": 2}, "attention": {"num_heads": 4}}
        config.train.steps = 20
        config.train.eval_every = 20
    elif variant:
        raise ValueError(f"config variant: expected '' or 'hybrid', got {variant!r}")
    return config
