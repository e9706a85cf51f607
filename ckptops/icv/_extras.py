"""Import the optional ``[icv]`` dependencies on demand, with one clear error when they are missing.

The checkpoint engine must run on a machine without transformers, accelerate or gguf, so nothing
outside :mod:`ckptops.icv` imports them, and inside it they are imported only when a function
needs them. A missing package becomes :class:`~ckptops.errors.MissingExtraError` telling the user
the one command that fixes it, instead of an ``ImportError`` traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ckptops.errors import MissingExtraError

INSTALL_HINT = "pip install -e '.[icv]' (in a clone of ckptops)"


def require(module_name: str, purpose: str) -> ModuleType:
    """Return the imported module, or raise MissingExtraError naming what needed it."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        package = module_name.split(".")[0]
        raise MissingExtraError(
            f"{purpose} needs the '{package}' package, which is not installed: {INSTALL_HINT}"
        ) from exc


def require_transformers(purpose: str = "loading a model") -> ModuleType:
    return require("transformers", purpose)


def require_accelerate(purpose: str = "low-memory loading (--max-memory)") -> ModuleType:
    return require("accelerate", purpose)


def require_gguf(purpose: str = "GGUF export") -> ModuleType:
    return require("gguf", purpose)
