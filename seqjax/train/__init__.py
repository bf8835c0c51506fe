"""Training: configs, the optimizer, the sharded step, checkpoints, metrics and the loop."""

from seqjax.train.config import default_config, validate
from seqjax.train.loop import train

__all__ = ["default_config", "train", "validate"]
