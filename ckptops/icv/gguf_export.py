"""Export an ICV as a llama.cpp control vector (GGUF), for ``llama-cli --control-vector``.

llama.cpp's format (the one vgel/repeng writes): ``general.architecture = "controlvector"``,
``controlvector.model_hint`` and ``controlvector.layer_count`` (both informational; llama.cpp's
loader reads only the tensors), and one 1-D float32 tensor ``direction.{k}`` per layer, where k
is the 0-based index of the decoder layer whose *output* llama.cpp adds it to. llama.cpp rejects
``direction.0`` and never steers layer 0, so layer 0 is dropped with a warning.

**Behaviour differs from the official rule.** llama.cpp adds the vector plainly to the residual
stream at every position: no cosine gate, no renormalisation, and not at the MLP output. The
closest thing it can run is the paper's rule without its rescaling, so the export writes
α·v (the paper-rule shift) and llama.cpp's ``--control-vector-scaled FILE SCALE`` multiplies it
again. Check the behaviour on your model before relying on it.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckptops.errors import ICVError, OutputError
from ckptops.icv._extras import require_gguf
from ckptops.icv.file import ICV, check_alpha, load_icv

ARCHITECTURE = "controlvector"


@dataclass(frozen=True)
class GGUFExport:
    """What was written: the file, the α used, the layers exported and those dropped."""

    path: Path
    alpha: float
    layers: list[int]
    dropped_layers: list[int]
    model_hint: str


def export_gguf(icv_or_path: ICV | str | os.PathLike, out: str | os.PathLike, *, model_hint: str | None = None,
                alpha: float | None = None, overwrite: bool = False) -> GGUFExport:
    """Write ``out`` as a llama.cpp control vector holding α·v for every layer except 0.

    ``alpha`` defaults to the file's α; ``model_hint`` to its model type (e.g. ``llama``).

    Example::

        ckptops.icv.gguf_export.export_gguf("icv.safetensors", "safety.gguf")
        # llama-cli -m model.gguf --control-vector safety.gguf -p "..."
    """
    gguf = require_gguf()
    icv = icv_or_path if isinstance(icv_or_path, ICV) else load_icv(icv_or_path)
    used_alpha = icv.alpha if alpha is None else check_alpha(alpha)
    hint = model_hint if model_hint is not None else icv.model_type
    if not hint:
        raise ICVError("the ICV records no model type; pass --model-hint (e.g. llama)")
    dropped = [i for i in icv.layers if i == 0]
    layers = [i for i in icv.layers if i != 0]
    if dropped:
        warnings.warn("llama.cpp cannot steer decoder layer 0 (it rejects direction.0); layer 0 is left out of the GGUF file",
                      stacklevel=2)
    if not layers:
        raise ICVError("nothing to export: llama.cpp cannot steer layer 0, and the ICV holds no other layer")
    target = Path(out)
    if target.exists() and not overwrite:
        raise OutputError(f"{target}: already exists (use --overwrite to replace it)")
    if target.is_dir():
        raise OutputError(f"{target}: is a folder, expected a file name such as control.gguf")
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
        writer.add_string(f"{ARCHITECTURE}.model_hint", hint)
        writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(layers))
        for index in layers:
            shift = (icv.vectors[index].double() * used_alpha).float().numpy().astype(np.float32)
            writer.add_tensor(f"direction.{index}", shift)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return GGUFExport(path=target, alpha=used_alpha, layers=layers, dropped_layers=dropped, model_hint=hint)
