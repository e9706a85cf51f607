"""The evaluation's error class, kept inside the one ckptops hierarchy.

``EvalError`` belongs in :mod:`ckptops.errors`; until it is added there this module defines the
same class (a :class:`~ckptops.errors.CkptopsError` subclass), so callers catching
``CkptopsError`` see no difference and the CLI prints it as one ``error:`` line.
"""

from __future__ import annotations

from ckptops import errors as _errors

try:
    EvalError = _errors.EvalError  # type: ignore[attr-defined]
except AttributeError:

    class EvalError(_errors.CkptopsError):  # type: ignore[no-redef]
        """An evaluation cannot run: a malformed prompt file, a judge that cannot be loaded or
        returns nonsense, a text file with too few tokens for perplexity."""


__all__ = ["EvalError"]
