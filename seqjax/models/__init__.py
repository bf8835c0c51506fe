"""Models built from the mixers of `seqjax.nn`; `build(config)` makes one from its config."""

from seqjax.models.language_model import (
    MIXERS,
    LanguageModel,
    LanguageModelCache,
    LanguageModelConfig,
)


def build(config: LanguageModelConfig) -> LanguageModel:
    """The model a config describes (the config validated itself when it was made)."""
    if isinstance(config, LanguageModelConfig):
        return LanguageModel(config)
    raise TypeError(f"config: expected a LanguageModelConfig, got {type(config).__name__}")


__all__ = ["MIXERS", "LanguageModel", "LanguageModelCache", "LanguageModelConfig", "build"]
