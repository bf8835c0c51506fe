import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.ops.hgrn import hgrn
from seqjax.segments import cu_seqlens_from_segment_ids, segment_ids_from_cu_seqlens


def test_cu_seqlens_to_segment_ids_marks_padding_as_its_own_segment():
    ids = segment_ids_from_cu_seqlens(jnp.array([0, 3, 4, 7]), 9)
    np.testing.assert_array_equal(ids, [[0, 0, 0, 1, 2, 2, 2, 3, 3]])


def test_round_trip_of_a_packed_row():
    cu = np.array([0, 2, 5, 6, 10], np.int32)
    ids = segment_ids_from_cu_seqlens(jnp.asarray(cu), 10)
    np.testing.assert_array_equal(cu_seqlens_from_segment_ids(ids), cu)


def test_rows_are_laid_end_to_end():
    ids = np.array([[0, 0, 1, 1], [5, 5, 5, 6]])
    np.testing.assert_array_equal(cu_seqlens_from_segment_ids(ids), [0, 2, 4, 7, 8])


def test_packing_by_cu_seqlens_equals_separate_sequences():
    x = jnp.arange(1.0, 8.0).reshape(1, 7, 1)
    g = jnp.full_like(x, -0.5)
    ids = segment_ids_from_cu_seqlens(jnp.array([0, 3, 7]), 7)
    packed, _ = hgrn(x, g, segment_ids=ids)
    first, _ = hgrn(x[:, :3], g[:, :3])
    second, _ = hgrn(x[:, 3:], g[:, 3:])
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], axis=1), rtol=1e-6)


def test_rejects_float_cu_seqlens():
    with pytest.raises(ValueError, match="cu_seqlens: expected a 1-D integer array"):
        segment_ids_from_cu_seqlens(jnp.array([0.0, 3.0]), 3)
