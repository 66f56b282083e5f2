"""Step-time ratios: the value, its spread from rounds or single steps, and "same" within noise."""

from __future__ import annotations

import math

import pytest

from memopt.core.timing import Ratio, ratio_of


def test_rounds_give_the_mean_ratio_and_half_the_range_as_the_spread():
    ratio = ratio_of([([1.2, 1.4], [1.0, 1.0]), ([2.6], [2.0]), ([1.25], [1.0])])
    assert ratio.value == pytest.approx((1.3 + 1.3 + 1.25) / 3)
    assert ratio.spread == pytest.approx(0.025) and ratio.rounds == 3
    assert ratio.text() == "1.28x ±0.03" and not ratio.same and ratio.known_to(0.05)


def test_one_round_takes_its_spread_from_the_single_steps():
    ratio = ratio_of([([1.0, 1.2], [1.0, 1.1])])
    assert ratio.value == pytest.approx(1.1 / 1.05)
    assert ratio.spread == pytest.approx(max(1.2 / 1.0 - 1.1 / 1.05, 1.1 / 1.05 - 1.0 / 1.1))
    assert ratio.same and ratio.text().startswith("same (1.05x ±")


def test_one_step_each_is_a_ratio_whose_spread_is_unknown():
    ratio = ratio_of([([2.0], [1.0])])
    assert ratio.value == 2.0 and math.isinf(ratio.spread)
    assert ratio.text() == "2.00x ±?" and not ratio.known_to(0.05)
    assert ratio.to_json() == {"ratio": 2.0, "spread": None, "rounds": 1, "same": False}


def test_a_ratio_within_noise_reads_same_and_outside_it_does_not():
    assert Ratio(0.97, 0.04).same and Ratio(1.04, 0.04).same
    assert not Ratio(0.40, 0.05).same and Ratio(0.40, 0.05).text() == "0.40x ±0.05"


def test_no_usable_round_is_an_error():
    with pytest.raises(ValueError):
        ratio_of([([], [1.0]), ([1.0], [0.0])])
