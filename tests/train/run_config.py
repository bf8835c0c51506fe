"""The tiny training run the loop tests share (a config file for `experiments.train`, and the
source of the in-process runs): one attention layer on short MQAR, 30 steps. The loop does not
depend on the mixer; attention is the quickest to compile."""

from seqjax.train.config import default_config


def get_config():
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
    return config
