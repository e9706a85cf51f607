"""Confidence intervals against published values.

Sources of the expected numbers (all 95%, rounded to 4 decimals as published):

- Newcombe RG (1998a), Statistics in Medicine 17:857-872, method 3 (Wilson score without
  continuity correction), the paper's worked examples 81/263 and 15/148.
- Fagerland, Lydersen & Laake (2017), Statistical Analysis of Contingency Tables, as printed by
  their R package contingencytables (tests/testthat/test-ch2.R, test-ch4.R, test-ch8.R):
  Wilson 13/16; Newcombe hybrid score for 7/34 vs 1/34 (Perondi et al. 2004); Newcombe
  square-and-add for the paired table [[59, 6], [16, 80]] (Cavo et al. 2012), estimate -0.0621.
- Newcombe RG (1998c), Statistics in Medicine 17:873-890, method 10 for 56/70 vs 48/80.
"""

from __future__ import annotations

import math
import random

import pytest

from ckptops.evaluate.stats import (
    independent_difference_interval,
    paired_difference_from_table,
    paired_difference_interval,
    wilson_interval,
)


@pytest.mark.parametrize(
    "k,n,low,high",
    [
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (13, 16, 0.5699, 0.9341),
    ],
)
def test_wilson_matches_published_limits(k, n, low, high):
    interval = wilson_interval(k, n)
    assert interval.estimate == pytest.approx(k / n)
    assert round(interval.low, 4) == pytest.approx(low, abs=1e-9)
    assert round(interval.high, 4) == pytest.approx(high, abs=1e-9)


@pytest.mark.parametrize("n", [1, 20, 29, 500])
def test_wilson_limits_at_zero_and_n_have_closed_forms(n):
    """At 0/n the Wilson interval is [0, z^2/(n+z^2)]; at n/n it is [n/(n+z^2), 1]."""
    z2 = 1.959963984540054**2
    none, every = wilson_interval(0, n), wilson_interval(n, n)
    assert (none.low, every.high) == (0.0, 1.0)
    assert none.high == pytest.approx(z2 / (n + z2), rel=1e-12)
    assert every.low == pytest.approx(n / (n + z2), rel=1e-12)


def test_independent_difference_matches_published_limits():
    perondi = independent_difference_interval(7, 34, 1, 34)
    assert (round(perondi.estimate, 4), round(perondi.low, 4), round(perondi.high, 4)) == (0.1765, 0.0189, 0.3404)
    newcombe = independent_difference_interval(56, 70, 48, 80)
    assert (round(newcombe.low, 4), round(newcombe.high, 4)) == (0.0524, 0.3339)


def test_paired_difference_matches_published_limits():
    # the book reports p(first) - p(second) = -0.0621 (-0.1186 to -0.0046); ckptops reports
    # second - first (model B - model A), the same interval mirrored.
    interval = paired_difference_from_table(59, 6, 16, 80)
    assert (round(interval.estimate, 4), round(interval.low, 4), round(interval.high, 4)) == (0.0621, 0.0046, 0.1186)


def test_paired_interval_from_outcomes_builds_the_table():
    # the same table as above, as per-item outcomes in a shuffled order
    pairs = [(True, True)] * 59 + [(True, False)] * 6 + [(False, True)] * 16 + [(False, False)] * 80
    random.Random(0).shuffle(pairs)
    a = [x for x, _ in pairs]
    b = [y for _, y in pairs]
    assert paired_difference_interval(a, b) == paired_difference_from_table(59, 6, 16, 80)
    mirrored = paired_difference_interval(b, a)
    assert mirrored.estimate == pytest.approx(-0.0621, abs=5e-5)
    assert (round(mirrored.low, 4), round(mirrored.high, 4)) == (-0.1186, -0.0046)


def test_identical_outcomes_give_a_zero_difference():
    same = [True, False, True, True, False] * 10
    interval = paired_difference_interval(same, same)
    assert interval.estimate == 0.0
    assert interval.low < 0.0 < interval.high


def test_empty_and_invalid_counts():
    assert all(math.isnan(x) for x in (wilson_interval(0, 0).low, wilson_interval(0, 0).high))
    assert math.isnan(paired_difference_interval([], []).estimate)
    with pytest.raises(ValueError):
        wilson_interval(5, 3)
    with pytest.raises(ValueError):
        paired_difference_interval([True], [True, False])
