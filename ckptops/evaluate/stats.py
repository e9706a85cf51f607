"""Confidence intervals for refusal rates, so that small prompt sets are read honestly.

A refusal rate of 12/50 and one of 18/50 look different; whether they *are* different depends on
the interval. Two methods, both from Robert Newcombe's comparisons of interval methods:

- :func:`wilson_interval`, the Wilson (1927) score interval for one proportion, without
  continuity correction (Newcombe 1998a, method 3). Unlike the textbook Wald interval it stays
  inside [0, 1] and keeps close to its nominal coverage at 0/n or n/n.
- :func:`paired_difference_interval`, Newcombe's (1998b, method 10) square-and-add interval for a
  difference of two **paired** proportions, built from the two Wilson intervals and the
  correlation between the paired outcomes. ``ckptops eval --compare`` runs both models on the
  same prompts, so the two rates are paired: each prompt gives one (model A, model B) outcome.
- :func:`independent_difference_interval`, Newcombe's (1998c, method 10) hybrid score interval for
  two proportions from different samples, for comparing rates measured on different prompts.

References:
    Wilson EB (1927). Probable inference, the law of succession, and statistical inference.
    JASA 22:209-212.
    Newcombe RG (1998a). Two-sided confidence intervals for the single proportion: comparison of
    seven methods. Statistics in Medicine 17:857-872.
    Newcombe RG (1998b). Improved confidence intervals for the difference between binomial
    proportions based on paired data. Statistics in Medicine 17:2635-2650.
    Newcombe RG (1998c). Interval estimation for the difference between independent
    proportions: comparison of eleven methods. Statistics in Medicine 17:873-890.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

#: The standard normal quantile for a two-sided 95% interval.
Z_95 = 1.959963984540054


@dataclass(frozen=True)
class Interval:
    """An estimate with the lower and upper limits of its confidence interval."""

    estimate: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


def wilson_interval(successes: int, n: int, z: float = Z_95) -> Interval:
    """The Wilson score interval for ``successes`` out of ``n`` (no continuity correction).

    ``n == 0`` gives an interval of NaNs: there is nothing to estimate.
    """
    _check_count(successes, n)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan)
    p = successes / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    denominator = 1 + z2 / n
    low = (centre - spread) / denominator
    high = (centre + spread) / denominator
    # exact limits at the ends (rounding could leave 1e-17 outside)
    if successes == 0:
        low = 0.0
    if successes == n:
        high = 1.0
    return Interval(p, max(0.0, low), min(1.0, high))


def paired_difference_interval(a: Sequence[bool], b: Sequence[bool], z: float = Z_95) -> Interval:
    """Interval for rate(b) - rate(a) when ``a[i]`` and ``b[i]`` are outcomes on the same item.

    Newcombe's method 10 for paired data, as in Fagerland, Lydersen & Laake, *Statistical
    Analysis of Contingency Tables* (2017), section 8.5: with the paired 2x2 table
    (n11 both, n12 a only, n21 b only, n22 neither), Wilson intervals (l1, u1) for p_a and
    (l2, u2) for p_b, and the correlation estimate psi (``A = n11*n22 - n12*n21``; psi =
    (A - N/2)/sqrt(row and column products) when A > N/2, 0 when 0 <= A <= N/2, A/sqrt(...)
    when A < 0), the limits for d = p_b - p_a are

        d - sqrt((p_b - l2)^2 + (u1 - p_a)^2 - 2 psi (p_b - l2)(u1 - p_a))
        d + sqrt((u2 - p_b)^2 + (p_a - l1)^2 - 2 psi (u2 - p_b)(p_a - l1))
    """
    if len(a) != len(b):
        raise ValueError("paired outcomes must have the same length")
    n11 = sum(1 for x, y in zip(a, b) if x and y)
    n12 = sum(1 for x, y in zip(a, b) if x and not y)
    n21 = sum(1 for x, y in zip(a, b) if not x and y)
    n22 = len(a) - n11 - n12 - n21
    return paired_difference_from_table(n11, n12, n21, n22, z=z)


def paired_difference_from_table(n11: int, n12: int, n21: int, n22: int, z: float = Z_95) -> Interval:
    """:func:`paired_difference_interval` from the paired 2x2 table; estimates p_col - p_row.

    Rows are the first measurement (yes, no), columns the second (yes, no): ``n12`` counts
    items that were "yes" first and "no" second. The estimate is the second rate minus the
    first, ``(n21 - n12) / N``.
    """
    cells = (n11, n12, n21, n22)
    if any(c < 0 for c in cells):
        raise ValueError("table counts must be non-negative")
    total = sum(cells)
    if total == 0:
        return Interval(math.nan, math.nan, math.nan)
    first_yes, first_no = n11 + n12, n21 + n22
    second_yes, second_no = n11 + n21, n12 + n22
    p1, p2 = first_yes / total, second_yes / total
    w1 = wilson_interval(first_yes, total, z)
    w2 = wilson_interval(second_yes, total, z)
    if 0 in (first_yes, first_no, second_yes, second_no):
        psi = 0.0
    else:
        product = math.sqrt(first_yes * first_no * second_yes * second_no)
        a = n11 * n22 - n12 * n21
        if a > total / 2:
            psi = (a - total / 2) / product
        elif a >= 0:
            psi = 0.0
        else:
            psi = a / product
    d = p2 - p1
    lower = math.sqrt(max(0.0, (p2 - w2.low) ** 2 + (w1.high - p1) ** 2 - 2 * psi * (p2 - w2.low) * (w1.high - p1)))
    upper = math.sqrt(max(0.0, (w2.high - p2) ** 2 + (p1 - w1.low) ** 2 - 2 * psi * (w2.high - p2) * (p1 - w1.low)))
    return Interval(d, max(-1.0, d - lower), min(1.0, d + upper))


def independent_difference_interval(k1: int, n1: int, k2: int, n2: int, z: float = Z_95) -> Interval:
    """Newcombe's hybrid score interval for k1/n1 - k2/n2 from two independent samples."""
    w1, w2 = wilson_interval(k1, n1, z), wilson_interval(k2, n2, z)
    if n1 == 0 or n2 == 0:
        return Interval(math.nan, math.nan, math.nan)
    p1, p2 = k1 / n1, k2 / n2
    d = p1 - p2
    lower = math.sqrt((p1 - w1.low) ** 2 + (w2.high - p2) ** 2)
    upper = math.sqrt((w1.high - p1) ** 2 + (p2 - w2.low) ** 2)
    return Interval(d, d - lower, d + upper)


def _check_count(successes: int, n: int) -> None:
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
