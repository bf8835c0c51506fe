"""Study 6 (`experiments/regbench.py`): a bad config fails at start, and the n-gram heads it
adds (`seqjax.nn.ngram`) compute the authors' definition, in parallel and token by token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.regbench import STUDY
from experiments.study import load_config, run_study
from seqjax.nn.ngram import Ngram, NgramConfig


def quick_config():
    return load_config("regbench", "quick")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(models=("attention", "mamba3")), r"config\.models: unknown entry 'mamba3'"),
        (dict(mixer_options={"attention": {"num_heads": 5}}), r"config\.mixer_options\.attention"),
        (dict(mixer_options={"mom": {}}), r"config\.mixer_options: unknown entry 'mom'"),
        (dict(ngram_orders=(1, 0)), r"config\.mixer_options\.ngram\.orders"),
        (dict(length=1), r"config\.length"),
    ],
)
def test_a_bad_config_fails_at_start(tmp_path, change, message):
    config = quick_config()
    config.update(change)
    with pytest.raises(ValueError, match=message):
        run_study(STUDY, config, [0], tmp_path)
    assert not any(tmp_path.iterdir())


def reference_ngram_head(tokens: np.ndarray, hidden: np.ndarray, order: int) -> np.ndarray:
    """seq_icl's `induction_head(x, hidden_state, shift_step=1, ngram=order)`, in NumPy."""
    length = tokens.shape[-1]
    causal = np.tril(np.ones((length, length), bool), k=-1)
    mask = (tokens[:, None, :] == tokens[:, :, None]) & causal
    masks = [mask]
    for _ in range(1, order):  # F.pad(mask, (1, -1, 1, -1)): shift both axes by one
        mask = np.pad(mask, ((0, 0), (1, 0), (1, 0)))[:, :length, :length]
        masks.append(mask)
    matched = np.sum(masks, axis=0) >= order
    matched = np.pad(matched, ((0, 0), (0, 0), (1, 0)))[:, :, :length] & causal  # shift_step 1
    counts = matched.sum(axis=2, keepdims=True)
    weights = np.divide(matched, counts, out=np.zeros(matched.shape), where=counts > 0)
    return np.einsum("bmn,bnz->bmz", weights, hidden)


def test_ngram_heads_match_the_reference_and_decode_as_in_parallel():
    orders, width, cut, prefill = (1, 2, 3), 8, 11, 16
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 3, size=(2, 28))  # three tokens: many repeated n-grams
    embedding = rng.normal(size=(3, width)).astype(np.float32)
    x = jnp.asarray(embedding[tokens])
    # Row 0 packs two documents ([0, cut) and [cut, T)); row 1 is one.
    segment_ids = jnp.asarray(np.stack([np.arange(28) >= cut, np.zeros(28, bool)]).astype(np.int32))
    mixer = Ngram(NgramConfig(width, orders=orders))
    params = jax.jit(mixer.init)(jax.random.key(0), x)
    # One compiled call per form: eager dispatch of the many small ops would dominate.
    apply = jax.jit(
        lambda p, x, segment_ids, cache: mixer.apply(p, x, segment_ids=segment_ids, cache=cache)
    )
    y, _ = apply(params, x, segment_ids, None)

    kernel = np.asarray(params["params"]["o"]["kernel"].unbox())  # [N + 1, D, D]
    bias = np.asarray(params["params"]["o"]["bias"].unbox())
    documents = [(0, slice(0, cut)), (0, slice(cut, 28)), (1, slice(0, 28))]
    for row, span in documents:
        seg_tokens, seg_x = tokens[row : row + 1, span], embedding[tokens[row : row + 1, span]]
        heads = [reference_ngram_head(seg_tokens, seg_x, order) for order in orders]
        expected = sum(h @ w for h, w in zip([*heads, seg_x], kernel, strict=True)) + bias
        np.testing.assert_allclose(y[row : row + 1, span], expected, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(y - x @ kernel[-1] - bias).max()) > 0.1  # the heads did read something

    cache = mixer.init_cache(2, 28)
    step = jax.jit(lambda p, x_t, c: mixer.apply(p, x_t, cache=c))
    out, cache = mixer.apply(
        params, x[:, :prefill], segment_ids=segment_ids[:, :prefill], cache=cache
    )
    outputs = [out]
    for t in range(prefill, 28):
        out, cache = step(params, x[:, t : t + 1], cache)
        outputs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), y, atol=1e-5, rtol=1e-5)
