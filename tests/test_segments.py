import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import assert_trees_close

from seqjax.ops.attention import softmax_attention
from seqjax.ops.hgrn import hgrn
from seqjax.ops.hybrid_attention import sliding_window_hybrid_attention
from seqjax.ops.short_conv import causal_conv
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


def test_an_id_that_comes_back_is_a_new_segment_for_every_op():
    """Ids [0 0 0 1 1 0 0 0] are three segments, as [0 0 0 1 1 2 2 2] are."""
    reused = jnp.asarray([[0, 0, 0, 1, 1, 0, 0, 0]])
    renumbered = jnp.asarray([[0, 0, 0, 1, 1, 2, 2, 2]])
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 8, 2, 4)) for i in range(3))
    cases = {
        "attention reference": lambda s: softmax_attention(
            q, k, v, segment_ids=s, impl="reference"
        ),
        "attention blockwise": lambda s: softmax_attention(
            q, k, v, segment_ids=s, impl="blockwise", block_size=4
        ),
        "hybrid chunked": lambda s: sliding_window_hybrid_attention(
            q, k, v, jnp.exp(q), jnp.exp(k), 2, 0.5, segment_ids=s, impl="chunked", chunk_size=4
        ),
        "short convolution": lambda s: causal_conv(
            q.reshape(1, 8, 8), jnp.ones((4, 8)), None, jnp.zeros((1, 3, 8)), s
        ),
    }
    for name, run in cases.items():
        assert_trees_close(run(reused), run(renumbered), 1e-6, name)
