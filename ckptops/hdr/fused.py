"""The optional fused chunk loops (the C extension ``ckptops.hdr._fused``, built by ``pip install``
when a C compiler is present).

Why optional: the torch path gives the same bits (the tests check both against one reference)
and needs no compiler; the fused loops make one pass over memory per chunk instead of eight to
ten, which roughly halves a global sanitize. ``CKPTOPS_NO_FUSED=1`` forces the torch path.
"""

from __future__ import annotations

import os

try:
    from ckptops.hdr import _fused
except ImportError:  # not built (no compiler at install time): the torch path is used
    _fused = None

#: input/output buffer kinds understood by the C loops
KIND_F32, KIND_BF16 = 0, 1


def enabled() -> bool:
    """True when the extension is built and not switched off with ``CKPTOPS_NO_FUSED``."""
    return _fused is not None and os.environ.get("CKPTOPS_NO_FUSED", "") in ("", "0")


def built() -> bool:
    """True when the extension is built (``CKPTOPS_NO_FUSED`` aside: the LoRA product uses it on
    both engine paths, so that they give the same bits)."""
    return _fused is not None


def lora_rows(left, right, rows: int, rank: int, cols: int, out, post_scale: float) -> None:
    """``out`` = (left @ right) * post_scale in float32, summed over the rank in order. See ``_fused.c``."""
    _fused.lora_rows(left, right, rows, rank, cols, out, post_scale)


def band_count(h, h_kind: int, b, b_kind: int, n: int, lo: int, size: int, hist) -> tuple[bool, int]:
    """Add |h - b|'s bit patterns to the band histogram; (all finite, peak). See ``_fused.c``."""
    return _fused.band_count(h, h_kind, b, b_kind, n, lo, size, hist)


def apply(h, h_kind: int, b, b_kind: int, t, t_kind: int, n: int, shrink: float | None, scale: float,
          out, out_kind: int, sums=None) -> tuple[bool, bool]:
    """``t - scale * hardshrink(h - b, shrink)`` into ``out``; (all finite, any selected non-zero).
    ``sums`` (float64[5], optional) gets the chunk's drift sums added (see :mod:`ckptops.hdr.drift`)."""
    return _fused.apply(h, h_kind, b, b_kind, t, t_kind, n, shrink or 0.0, shrink is not None, scale, out, out_kind,
                        sums)


def band_collect(h, h_kind: int, b, b_kind: int, t, t_kind: int, n: int, lo: int, size: int, shift: int, hist,
                 idx, taus, targets, bases) -> tuple[bool, int, int]:
    """:func:`band_count` with in-band patterns counted ``2**shift`` to a counter, and every
    in-band value's index, tau, target and base value written to ``idx``/``taus``/``targets``/
    ``bases``; (all finite, peak, how many were written). See ``_fused.c``."""
    return _fused.band_collect(h, h_kind, b, b_kind, t, t_kind, n, lo, size, shift, hist, idx, taus, targets, bases)
