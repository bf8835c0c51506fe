"""Study 2, recall versus state size (`experiments/recall.py`): bad configs fail at start, the
x-axis counts each family's state as its recurrence holds it, and the verdict's reading of
(state, accuracy)."""

from __future__ import annotations

import pytest

from experiments.recall import STUDY, state_floats, train_config
from experiments.study import Summary, load_config, run_study


def quick_config():
    return load_config("recall", "quick")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(mixers=("delta_net", "mamba9")), r"config\.mixers: unknown entry 'mamba9'"),
        (dict(widths=(16, 33)), r"config\.widths: 33 is not a positive multiple of num_heads"),
        (dict(num_kv_pairs=(4, 12)), r"config\.num_kv_pairs: 12 pairs: length: expected at least"),
        (dict(mixer_options={"delta_net": {"expand_q": 2}}), r"config\.mixer_options\.delta_net"),
    ],
)
def test_a_bad_config_fails_at_start(tmp_path, change, message):
    config = quick_config()
    config.update(change)
    with pytest.raises(ValueError, match=message):
        run_study(STUDY, config, [0], tmp_path)
    assert not any(tmp_path.iterdir())


def test_state_floats_are_the_kv_cache_for_attention_and_the_matrix_state_otherwise():
    config = quick_config()
    config.length, config.num_heads = 64, 2
    width, heads = 32, 2

    def floats(mixer):
        return state_floats(train_config(config, mixer, width, 4, 1e-3, 0), config.vocab_size)

    # Attention keeps the keys and values of all T tokens, 2 T d, plus the last 2 inputs of
    # its width-3 convolutions on q, k, v.
    assert floats("attention") == 2 * config.length * width + 2 * 3 * width
    # DeltaNet: H matrices of (d / H) x (d / H), plus the q, k, v convolutions' last 3 inputs.
    assert floats("delta_net") == heads * (width // heads) ** 2 + 3 * 3 * width
    # The matrix state grows quadratically with the width: a family's state axis.
    wider = state_floats(train_config(config, "delta_net", 2 * width, 4, 1e-3, 0), 64)
    assert wider > 3 * floats("delta_net")


def test_verdict_leaves_out_saturated_series_and_compares_by_dominance():
    def row(mixer, width, accuracy, state):
        return dict(
            mixer=mixer,
            width=width,
            num_kv_pairs=8,
            accuracy=(accuracy, 0.0, 1),
            state_floats=(state, 0.0, 1),
        )

    rows = [
        row("based", 32, 0.99, 9000.0),  # perfect at its smallest state: saturated
        row("based", 64, 1.0, 18000.0),
        row("gla", 32, 0.02, 400.0),  # rises
        row("gla", 64, 0.97, 1400.0),
        row("delta_net", 32, 0.50, 800.0),  # flat
        row("delta_net", 64, 0.52, 2600.0),
    ]
    text = STUDY.verdict(Summary(rows, [0], {}))
    assert "rises from the smallest to the largest state in 1 of 2" in text
    assert "(1 more are perfect at their smallest state)" in text
    # gla: less accurate with less state at width 32 (neither), within the margin with less
    # state at width 64 (a win).
    assert "gla beats linear attention (based): as accurate with less state or more " in text
    assert "in 1 of 2 cells, the reverse in 0" in text
    # delta_net: far less accurate with less state in both cells: neither wins.
    assert "delta_net ties linear attention (based)" in text
