"""The search space: which (scale, top-k, ICV alpha) candidates ``tune`` tries, and their checks.

Every value is checked before any model loads, so a typo costs nothing: scales must be finite and
>= 0 (a negative scale ADDS the harm vector: ``sanitize`` and ``run`` refuse it without ``--force``,
and a search has no reason to try it; scale 0 is the target itself), top-k fractions must lie in (0, 1] (as ``sanitize`` requires), ICV alphas finite and >= 0
(alpha 0 means "no ICV").
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from ckptops.errors import UsageError

#: the shipped defaults (``ckptops sanitize`` / ``ckptops run``), always reported as a reference
DEFAULT_SCALE = 3.0
DEFAULT_TOP_K = 0.10
DEFAULT_ICV_ALPHA = 0.12


@dataclass(frozen=True, order=True)
class Candidate:
    """One setting: HDR ``scale`` and ``top_k`` (scale 0: no HDR) and the ICV ``alpha`` (0: no ICV)."""

    top_k: float
    scale: float
    alpha: float = 0.0

    @property
    def key(self) -> str:
        """A stable name for logs and tables (``repr`` of floats round-trips exactly)."""
        return f"scale={self.scale!r},top_k={self.top_k!r},alpha={self.alpha!r}"

    @property
    def hdr(self) -> tuple[float, float]:
        """What the weights depend on: the ICV is computed once per (top_k, scale)."""
        return (self.top_k, self.scale)

    @property
    def is_target(self) -> bool:
        return self.scale == 0.0 and self.alpha == 0.0

    def as_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "top_k": self.top_k, "alpha": self.alpha}

    def label(self) -> str:
        if self.is_target:
            return "target (unchanged)"
        hdr = f"HDR scale {self.scale:g}, top-k {self.top_k:g}" if self.scale != 0.0 else "no HDR"
        return hdr + (f" + ICV alpha {self.alpha:g}" if self.alpha else "")


#: the unmodified target: the reference every candidate is compared with
TARGET = Candidate(top_k=1.0, scale=0.0, alpha=0.0)


def parse_floats(text: str | list | tuple, option: str) -> list[float]:
    """``"0.5,1,2"`` (or a list of numbers) -> ``[0.5, 1.0, 2.0]``, de-duplicated, order kept."""
    items = text.split(",") if isinstance(text, str) else list(text)
    values: list[float] = []
    for item in items:
        raw = item.strip() if isinstance(item, str) else item
        if raw == "":
            continue
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise UsageError(f"{option}: {raw!r} is not a number") from None
        if value not in values:
            values.append(value)
    if not values:
        raise UsageError(f"{option}: give at least one value, e.g. {option} 1,2,3")
    return values


def check_space(scales: list[float], top_ks: list[float], alphas: list[float]) -> None:
    """One-line errors for values ``sanitize`` or the ICV would refuse."""
    for s in scales:
        if not math.isfinite(s):
            raise UsageError(f"--scales: {s!r} is not a finite number")
        if s < 0:
            raise UsageError(f"--scales: {s:g} is negative: HDR would ADD the harm vector (a more harmful model); "
                             "give scales >= 0 (0 is the target itself)")
    for k in top_ks:
        if not math.isfinite(k) or not 0 < k <= 1:
            raise UsageError(f"--top-ks: {k!r} is not a fraction in (0, 1] (0.1 keeps the largest 10%)")
    for a in alphas:
        if not math.isfinite(a) or a < 0:
            raise UsageError(f"--icv-alphas: {a!r} is not a finite number >= 0 (0 means no ICV)")


def grid(scales: list[float], top_ks: list[float], alphas: list[float]) -> list[Candidate]:
    """Every combination, ordered so that each HDR setting is applied once and its ICV computed
    once: by top-k (one threshold selection each), then scale, then alpha."""
    check_space(scales, top_ks, alphas)
    return [Candidate(top_k=k, scale=s, alpha=a) for k, s, a in itertools.product(top_ks, scales, alphas)]
