"""The main job's task for GLA (with the short convolution recall needs; fla's default has
none): 2 layers on MQAR with 8 key-value pairs in 64 tokens.

    python -m experiments.train --config=configs/mqar_gla.py
"""

from configs.mqar_delta_net import get_config as delta_net_config


def get_config():
    config = delta_net_config()
    config.model.layers = ("gla", "gla")
    config.model.mixer_options = {"gla": {"num_heads": 2, "use_short_conv": True}}
    return config
