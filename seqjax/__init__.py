"""seqjax: sequence models built on recurrences, in JAX."""

from seqjax import checks, ops, scan, segments

__all__ = ["checks", "ops", "scan", "segments"]
