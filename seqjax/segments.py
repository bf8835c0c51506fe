"""Packed sequences: conversions between `segment_ids` and `cu_seqlens`.

seqjax ops take `segment_ids: [B, T]` (the id changes where a new document starts). Kernels and
data pipelines from the PyTorch world describe the same packing of one row by cumulative
sequence lengths `cu_seqlens = [0, len_0, len_0 + len_1, ..., T_used]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def segment_ids_from_cu_seqlens(cu_seqlens: jax.Array, length: int) -> jax.Array:
    """`[1, length]` int32 segment ids of one packed row from `cu_seqlens: [S + 1]`.

    Token t gets the index of the segment that contains it; tokens at or past
    `cu_seqlens[-1]` (padding) form one more segment, id S. Works under `jit`.
    """
    cu_seqlens = jnp.asarray(cu_seqlens)
    if cu_seqlens.ndim != 1 or not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
        raise ValueError(
            f"cu_seqlens: expected a 1-D integer array [S + 1], got {cu_seqlens.dtype} "
            f"{cu_seqlens.shape}"
        )
    positions = jnp.arange(length)
    ids = jnp.searchsorted(cu_seqlens[1:], positions, side="right")
    return ids.astype(jnp.int32)[None]


def cu_seqlens_from_segment_ids(segment_ids: jax.Array) -> np.ndarray:
    """`cu_seqlens` of the rows of `segment_ids: [B, T]` laid end to end (host-side).

    A new segment starts at every change of id within a row and at the start of every row.
    The result's length depends on the values, so this runs on concrete arrays only.
    """
    ids = np.asarray(segment_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"segment_ids: expected an integer array [B, T], got {ids.dtype} {ids.shape}"
        )
    batch, length = ids.shape
    starts = np.ones((batch, length), bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return np.append(np.flatnonzero(starts.reshape(-1)), batch * length).astype(np.int32)
