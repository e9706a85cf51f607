"""Lazy re-exports for package ``__init__`` modules: a name is imported from its defining module
on first use, so ``import ckptops`` stays fast and never pulls in transformers or huggingface_hub
for users who only need the checkpoint engine."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` that resolves ``exports`` (name -> module) on demand."""

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__
