"""Data: synthetic task sources, text corpora, TFDS builders and the grain input pipeline.

Every source follows `seqjax.data.source` (index-addressable examples of `inputs` and sparse
`targets`); `TASKS` names them for configs and `make_source(name, **options)` builds one.
"""

from __future__ import annotations

from typing import Any

from seqjax.data.copying import Copying, InductionHeads, SelectiveCopying
from seqjax.data.forecasting import NoisySinusoids
from seqjax.data.recall import MQAR, Passkey, SetDisjointness
from seqjax.data.regbench import RegBench
from seqjax.data.source import IGNORE
from seqjax.data.state_tracking import (
    ModularArithmetic,
    ModularArithmeticBrackets,
    ModularCounting,
    Parity,
    PermutationComposition,
)
from seqjax.data.text import StdlibCorpus, TFDSText
from seqjax.data.tfds_builders import StoredTask

TASKS: dict[str, type] = {
    "mqar": MQAR,
    "set_disjointness": SetDisjointness,
    "passkey": Passkey,
    "copying": Copying,
    "selective_copying": SelectiveCopying,
    "induction_heads": InductionHeads,
    "parity": Parity,
    "modular_counting": ModularCounting,
    "modular_arithmetic": ModularArithmetic,
    "modular_arithmetic_brackets": ModularArithmeticBrackets,
    "permutation_composition": PermutationComposition,
    "regbench": RegBench,
    "stdlib_text": StdlibCorpus,
    "tfds_text": TFDSText,
    "stored_task": StoredTask,
    "noisy_sinusoids": NoisySinusoids,
}


def make_source(name: str, **options: Any):
    """The source `TASKS[name]` with `options` (its fields); a `ValueError` naming an unknown
    task or option."""
    if name not in TASKS:
        raise ValueError(f"data.task: unknown dataset {name!r}, expected one of {sorted(TASKS)}")
    try:
        return TASKS[name](**options)
    except TypeError as error:
        raise ValueError(f"data.options: {name}: {error}") from None


__all__ = ["IGNORE", "TASKS", "make_source"]
