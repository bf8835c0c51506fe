"""What every data source is: index-addressable examples of token inputs and sparse targets.

A source is a `Sequence` of examples (grain reads it directly as a random-access data source):
`len(source)` examples, and `source[i]` is a pure function of the source's `seed` and `i`, so
a sweep needs no prepare step and any worker or host can produce any example.

An example is a dict of NumPy arrays whose leading axis is the example's length `T` (it may
differ between examples; batching pads or packs them):

- `inputs: [T] int32`: the tokens the model reads;
- `targets: [T] int32`: the token to predict at each position, `IGNORE` where there is no
  loss (a synthetic task supervises only some positions: MQAR's queries, parity's last token);
- optional task fields with the same leading axis (RegBench's `valid: [T, V] bool`, the set of
  valid next tokens, for its validity metric).
"""

from __future__ import annotations

import numpy as np

IGNORE = -100


def example_rng(seed: int, index: int) -> np.random.Generator:
    """Example `index`'s own generator: a pure function of `(seed, index)`, independent of
    every other example's (NumPy's SeedSequence mixes the pair)."""
    return np.random.default_rng([seed, index])


def check_index(index: int, length: int) -> int:
    """`index` as a position in `[0, length)`, negative indices counting from the end; an
    `IndexError` naming the range otherwise."""
    position = index + length if index < 0 else index
    if not 0 <= position < length:
        raise IndexError(f"index: {index} is out of range for a source of {length} examples")
    return position


def example(inputs: np.ndarray, targets: np.ndarray, **fields: np.ndarray) -> dict:
    """An example dict in the layout above (int32 tokens; task fields as given)."""
    return {
        "inputs": np.asarray(inputs, np.int32),
        "targets": np.asarray(targets, np.int32),
        **fields,
    }
