"""Models built from the mixers of `seqjax.nn`; `build(config)` makes one from its config."""

from seqjax.models.backbone import MIXERS, BackboneConfig
from seqjax.models.classifier import SequenceClassifier, SequenceClassifierConfig
from seqjax.models.counts import parameter_count, state_size
from seqjax.models.language_model import LanguageModel, LanguageModelCache, LanguageModelConfig

MODELS = {LanguageModelConfig: LanguageModel, SequenceClassifierConfig: SequenceClassifier}


def build(config: LanguageModelConfig | SequenceClassifierConfig):
    """The model a config describes (the config validated itself when it was made)."""
    model = MODELS.get(type(config))
    if model is None:
        expected = " or ".join(c.__name__ for c in MODELS)
        raise TypeError(f"config: expected a {expected}, got {type(config).__name__}")
    return model(config)


__all__ = [
    "MIXERS",
    "BackboneConfig",
    "LanguageModel",
    "LanguageModelCache",
    "LanguageModelConfig",
    "SequenceClassifier",
    "SequenceClassifierConfig",
    "build",
    "parameter_count",
    "state_size",
]
