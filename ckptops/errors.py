"""One exception hierarchy for everything ckptops refuses to do.

Every error a user can cause (a bad file, a bad option, a model that does not fit) is raised as a
subclass of :class:`CkptopsError` with a message that names the file or tensor and says what is
wrong, in one line. The CLI prints ``error: <message>`` and exits non-zero without a traceback;
library users catch :class:`CkptopsError` (or a subclass) the same way.
"""

from __future__ import annotations


class CkptopsError(Exception):
    """Base class: a problem with the user's input or request, reported in one line."""

    exit_code = 1

    def __str__(self) -> str:  # keep the message on one line whatever the cause text holds
        return " ".join(super().__str__().split())


class UsageError(CkptopsError):
    """An option or parameter is out of range or contradicts another (top-k, scale, paths)."""

    exit_code = 2


class CheckpointError(CkptopsError):
    """A checkpoint cannot be read: missing files, pickle-only folders, malformed safetensors."""


class HeaderError(CheckpointError):
    """A safetensors header is malformed or unsafe (size, JSON, dtypes, offsets)."""


class IndexFileError(CheckpointError):
    """A ``model.safetensors.index.json`` is malformed or points outside its folder."""


class MismatchError(CkptopsError):
    """The checkpoints do not line up: tensor names, shapes or dtypes differ."""


class TensorValueError(CkptopsError):
    """A tensor holds values ckptops cannot use (NaN/Inf), or a result is not finite."""


class OutputError(CkptopsError):
    """The output location is unusable (exists without --overwrite, is an input, ...)."""


class HubError(CkptopsError):
    """A Hugging Face Hub reference cannot be resolved, downloaded or pushed."""


class ICVError(CkptopsError):
    """An in-context vector cannot be computed, read, or applied to this model."""


class RecipeError(CkptopsError):
    """A recipe file is invalid: unknown keys, wrong types, missing models, bad overrides."""


class MissingExtraError(CkptopsError):
    """An optional dependency (transformers, accelerate, gguf) is needed but not installed."""


class EvalError(CkptopsError):
    """An evaluation cannot run: a malformed prompt file, a judge that cannot be loaded or returns
    nonsense, a text too short for perplexity."""
