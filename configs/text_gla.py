"""Byte-level language modelling on the Python standard library's source (a real corpus on
every machine): a small GLA with packed documents.

    python -m experiments.train --config=configs/text_gla.py
"""

from seqjax.train.config import default_config


def get_config():
    config = default_config()
    config.data.task = "stdlib_text"
    config.data.options = {"split": "train"}
    config.data.eval_options = {"split": "validation"}
    config.data.length = 256
    config.data.batch_size = 16
    config.data.packing = "pack"
    config.model.width = 128
    config.model.layers = ("gla", "gla", "gla", "gla")
    config.model.mixer_options = {"gla": {"num_heads": 2}}
    config.optimizer.learning_rate = 2e-3
    config.train.steps = 1000
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    config.train.best_metric = "eval/loss"
    return config
