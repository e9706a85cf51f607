"""Checks that need no model loaded, run before any command loads one.

A bad ``--alpha``, a ``--layers`` range beyond the model or a ``--device`` this machine lacks
used to fail only after the model had loaded (seconds to minutes). Everything here reads at most
a ``config.json``: the layer count of a local folder is known without its weights.
"""

from __future__ import annotations

import os
from pathlib import Path

from ckptops.errors import UsageError


def check_device(device: str | None) -> None:
    """Refuse ``cuda``/``cuda:N``/``mps`` when this machine (and this torch) has no such device."""
    if not device or device == "cpu":
        return
    import torch

    kind, _, number = str(device).partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: this machine (or this torch build) has no CUDA device; use --device cpu")
        if number and (not number.isdigit() or int(number) >= torch.cuda.device_count()):
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")
    elif kind not in ("cpu", "xpu", "meta"):
        raise UsageError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:N, mps)")


def _config_int(model_ref: str | os.PathLike, keys) -> int | None:
    """The first positive integer among ``keys`` in a local folder's config.json (its text
    model's part for a multimodal one); None when unknown."""
    from ckptops.safeio import load_json_file

    config = Path(model_ref) / "config.json"
    if not config.is_file():
        return None
    try:
        data = load_json_file(config, 16 * 1024 * 1024, UsageError, "config.json")
    except UsageError:
        return None  # the loader reports a broken config in its own words
    if not isinstance(data, dict):
        return None
    text = data.get("text_config") if isinstance(data.get("text_config"), dict) else data
    for key in keys:
        value = text.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def config_layers(model_ref: str | os.PathLike) -> int | None:
    """``num_hidden_layers`` (or ``n_layer``) from a local folder's config.json; None when unknown."""
    return _config_int(model_ref, ("num_hidden_layers", "n_layer", "num_layers"))


def config_window(model_ref: str | os.PathLike) -> int | None:
    """The context window in tokens from a local folder's config.json (the keys
    :func:`ckptops.evaluate.generate.context_window` reads on a loaded model); None when unknown."""
    from ckptops.evaluate.generate import WINDOW_KEYS

    return _config_int(model_ref, WINDOW_KEYS)


def check_layers_fit(layers, count: int | None, where: str, option: str = "--layers") -> None:
    """Refuse layer indices the model does not have (``layers``: a set of ints or None)."""
    if layers is None or count is None:
        return
    beyond = sorted(i for i in layers if i >= count)
    if beyond:
        raise UsageError(f"{option} {beyond[0]}{'...' if len(beyond) > 1 else ''}: not in 0..{count - 1} "
                         f"({where} has {count} decoder layers)")


def check_layers_text(text: str | None, option: str = "--layers") -> None:
    """``--layers ''`` is a mistake, not "all layers": say so instead of silently using every layer."""
    if text is not None and not str(text).strip():
        raise UsageError(f"{option} '' names no layer; leave {option} out to use every layer")
