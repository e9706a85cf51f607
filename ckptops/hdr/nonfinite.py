"""Finding NaN/Inf in input values without torch, and the error that names where they are.

Both engine paths detect a non-finite value cheaply inside their loops; this module then
re-reads the chunk to say which file and tensor holds it, and checks copied tensors' raw bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ckptops.checkpoint.dtypes import FLOAT_CODES
from ckptops.checkpoint.reader import Staging
from ckptops.errors import TensorValueError

if TYPE_CHECKING:
    from ckptops.hdr.chunks import Chunk
    from ckptops.hdr.engine import Models

#: exponent bits of each float code's raw pattern (all ones: Inf or NaN), as the unsigned
#: integer view of the same width
_EXPONENT = {"BF16": (np.uint16, 0x7F80), "F16": (np.uint16, 0x7C00), "F32": (np.uint32, 0x7F800000),
             "F64": (np.uint64, 0x7FF0000000000000)}


def _nonfinite_mask(raw: np.ndarray, dtype: str) -> np.ndarray:
    """True where the value in ``raw`` (a tensor's bytes as uint8) of float code ``dtype`` has an
    all-ones exponent: Inf or NaN."""
    view, exponent = _EXPONENT[dtype]
    return np.bitwise_and(raw.view(view), view(exponent)) == view(exponent)


def nonfinite_positions(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Indices of the NaN/Inf values in ``raw`` (the tensor's bytes as uint8) of float code ``dtype``."""
    return np.flatnonzero(_nonfinite_mask(raw, dtype))


def raw_all_finite(raw: np.ndarray, dtype: str) -> bool:
    """True when the raw bytes of a float tensor hold no NaN/Inf (non-float codes: always)."""
    return dtype not in FLOAT_CODES or not bool(_nonfinite_mask(raw, dtype).any())


def nonfinite_error(chunk: Chunk, models: Models, result: str = "tau") -> TensorValueError:
    """Find which input holds NaN/Inf in this chunk and name its file and tensor."""
    task = chunk.task
    stage = Staging(chunk.size)
    for label, ckpt, info in (
        ("target", models.target, task.target),
        ("base", models.base, task.base),
        ("harmful", models.harmful, task.harmful),
    ):
        if info is None or info.dtype not in FLOAT_CODES or chunk.stop > info.numel:
            continue
        raw = np.frombuffer(stage.read_raw(models.files, ckpt, info, chunk.start, chunk.stop), dtype=np.uint8)
        bad = nonfinite_positions(raw, info.dtype)
        if bad.size:
            where = models.files.fd(ckpt, info.shard)[1]
            return TensorValueError(
                f"{where}: tensor {task.name!r} ({label}) holds NaN or Inf (first at element {chunk.start + int(bad[0])})"
            )
    return TensorValueError(f"tensor {task.name!r}: {result} overflows float32 (inputs are finite but too large)")
