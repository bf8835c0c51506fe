"""The copying sources: each generator's published spec, and targets recomputed by plain
Python (the contract every source shares is in `test_sources.py`)."""

import numpy as np
import pytest

from seqjax.data.copying import Copying, InductionHeads, SelectiveCopying
from seqjax.data.source import IGNORE


def labelled(targets):
    return np.flatnonzero(targets != IGNORE)


# Copying (Jelassi et al.): `$ s | s .`, the copy predicted LM style.


def test_copying_layout_and_lm_targets():
    source = Copying(alphabet_size=5, min_tokens=2, max_tokens=9)
    for i in range(300):
        inputs = source[i]["inputs"].tolist()
        targets = source[i]["targets"].tolist()
        n = inputs.index(source.copy_token) - 1
        string = inputs[1 : n + 1]
        assert inputs == [source.start_token, *string, source.copy_token, *string, source.end_token]
        assert all(0 <= symbol < 5 for symbol in string)
        expected = [IGNORE] * (n + 1) + string + [source.end_token] + [IGNORE]
        assert targets == expected


def test_copying_lengths_are_uniform_over_the_range():
    source = Copying(alphabet_size=4, min_tokens=3, max_tokens=6)
    counts = np.bincount([(source[i]["inputs"].size - 3) // 2 for i in range(800)], minlength=7)
    assert counts[:3].sum() == 0
    np.testing.assert_allclose(counts[3:] / 800, 0.25, atol=0.06)


def test_copying_symbols_are_uniform_over_the_alphabet():
    source = Copying(alphabet_size=6, min_tokens=10, max_tokens=10)
    strings = np.concatenate([source[i]["inputs"][1:11] for i in range(300)])
    np.testing.assert_allclose(np.bincount(strings, minlength=6) / strings.size, 1 / 6, atol=0.02)


def test_copying_special_tokens_follow_the_alphabet():
    source = Copying(alphabet_size=26)
    assert (source.start_token, source.copy_token, source.end_token) == (26, 27, 28)
    assert source.vocab_size == 29
    assert source.max_length == 43


# Selective copying (Mamba, s4's generator): data tokens among blanks, recalled at the markers.


def test_selective_copying_layout_and_targets():
    source = SelectiveCopying(vocab_size=6, length=20, num_tokens=5)
    for i in range(300):
        inputs = source[i]["inputs"].tolist()
        targets = source[i]["targets"].tolist()
        assert len(inputs) == 20 + 2 * 5
        region, markers = inputs[:25], inputs[25:]
        assert markers == [5] * 5
        data = [token for token in region if token != 0]
        assert len(data) == 5 and all(1 <= token <= 4 for token in data)
        assert targets == [IGNORE] * 25 + data


def test_selective_copying_positions_are_uniform_over_the_region():
    source = SelectiveCopying(vocab_size=5, length=12, num_tokens=4)
    positions = np.concatenate([np.flatnonzero(source[i]["inputs"][:16]) for i in range(500)])
    frequency = np.bincount(positions, minlength=16) / 500
    np.testing.assert_allclose(frequency, 4 / 16, atol=0.07)


def test_selective_copying_data_tokens_are_uniform():
    source = SelectiveCopying(vocab_size=6, length=8, num_tokens=8)
    data = np.concatenate([source[i]["targets"][16:] for i in range(300)])
    np.testing.assert_allclose(np.bincount(data, minlength=5)[1:] / data.size, 1 / 4, atol=0.03)
    assert np.bincount(data, minlength=5)[0] == 0


def test_copying_memory_puts_the_data_first():
    source = SelectiveCopying(vocab_size=8, length=30, num_tokens=4, random_positions=False)
    for i in range(50):
        inputs, targets = source[i]["inputs"], source[i]["targets"]
        assert (inputs[:4] > 0).all() and (inputs[4:34] == 0).all()
        np.testing.assert_array_equal(targets[34:], inputs[:4])


# Induction heads (H3 / Mamba, safari's generator): recall the token after the earlier trigger.


def test_induction_heads_target_is_the_token_after_the_earlier_trigger():
    source = InductionHeads(vocab_size=6, length=24)
    for i in range(300):
        inputs = source[i]["inputs"].tolist()
        targets = source[i]["targets"].tolist()
        triggers = [t for t, token in enumerate(inputs) if token == source.trigger_token]
        assert len(triggers) == 2 and triggers[1] == 23
        assert triggers[0] + 1 < 22
        assert targets == [IGNORE] * 23 + [inputs[triggers[0] + 1]]


def test_induction_heads_trigger_position_is_uniform():
    source = InductionHeads(vocab_size=4, length=8)
    positions = [int(np.flatnonzero(source[i]["inputs"][:-1] == 3)[0]) for i in range(2000)]
    np.testing.assert_allclose(np.bincount(positions, minlength=5) / 2000, 1 / 5, atol=0.04)


def test_induction_heads_noise_and_answers_use_every_other_token():
    source = InductionHeads(vocab_size=5, length=64)
    noise = np.concatenate([source[i]["inputs"][:-1] for i in range(100)])
    answers = [source[i]["targets"][-1] for i in range(300)]
    np.testing.assert_allclose(np.bincount(noise, minlength=5)[:4] / noise.size, 0.25, atol=0.03)
    assert set(answers) == {0, 1, 2, 3}


# Bad settings name the field.


@pytest.mark.parametrize(
    ("cls", "settings", "field"),
    [
        (Copying, {"alphabet_size": 0}, "alphabet_size"),
        (Copying, {"min_tokens": 0}, "min_tokens"),
        (Copying, {"min_tokens": 8, "max_tokens": 7}, "max_tokens"),
        (Copying, {"max_tokens": 2.5}, "max_tokens"),
        (Copying, {"seed": -1}, "seed"),
        (Copying, {"num_examples": 0}, "num_examples"),
        (SelectiveCopying, {"vocab_size": 2}, "vocab_size"),
        (SelectiveCopying, {"length": 0}, "length"),
        (SelectiveCopying, {"num_tokens": -3}, "num_tokens"),
        (SelectiveCopying, {"random_positions": "yes"}, "random_positions"),
        (SelectiveCopying, {"seed": 1.5}, "seed"),
        (SelectiveCopying, {"num_examples": 0}, "num_examples"),
        (InductionHeads, {"vocab_size": 1}, "vocab_size"),
        (InductionHeads, {"length": 3}, "length"),
        (InductionHeads, {"seed": -2}, "seed"),
        (InductionHeads, {"num_examples": 0}, "num_examples"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_field(cls, settings, field):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        cls(**settings)
