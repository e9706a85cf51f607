"""The safetensors dtype codes ckptops understands, their sizes and torch equivalents.

Kept in one table so that header validation, reading, arithmetic and writing agree on what a dtype
code means. Only the four float codes take part in arithmetic; other tensors are copied unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

# code -> (itemsize in bytes, name of the torch dtype). Plain data: header validation (inspect, the
# Hub preflight) needs no torch, whose import costs more than a second.
SAFETENSORS_DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
    "U16": (2, "uint16"),
    "U32": (4, "uint32"),
    "U64": (8, "uint64"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
}

#: dtypes that HDR does arithmetic on (converted to float32, rounded back once)
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})

#: names users type for --dtype -> safetensors code
DTYPE_NAMES = {
    "float32": "F32", "fp32": "F32", "f32": "F32",
    "float16": "F16", "fp16": "F16", "f16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
    "float64": "F64", "fp64": "F64",
}

#: safetensors code -> the name transformers writes into config.json's dtype field
CONFIG_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def itemsize(code: str) -> int:
    return SAFETENSORS_DTYPES[code][0]


def torch_dtype(code: str) -> "torch.dtype":
    """The torch dtype of a code (only float codes are ever converted; others are copied as bytes)."""
    import torch

    return getattr(torch, SAFETENSORS_DTYPES[code][1])


#: numpy dtype of each float code's raw little-endian values (bfloat16: its uint16 bit patterns)
NUMPY_FLOATS = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def widen_into(data, code: str, out: "np.ndarray") -> None:
    """Raw little-endian values of a float code into the float32 array ``out`` (as long as the
    values): float16/bfloat16 widened exactly, float64 rounded to nearest (beyond float32: Inf),
    as torch's ``.float()``. The one conversion the readers share."""
    import numpy as np

    source = np.frombuffer(data, dtype=NUMPY_FLOATS[code])
    if code == "BF16":  # bfloat16 is the top half of a float32: widen the bits
        np.left_shift(source, 16, out=out.view(np.uint32), dtype=np.uint32)
        return
    with np.errstate(over="ignore"):
        np.copyto(out, source, casting="same_kind")


def bfloat16_bits(values: "np.ndarray") -> "np.ndarray":
    """float32 values rounded to bfloat16, nearest even, as uint16 bit patterns (what
    ``c10::BFloat16`` gives for finite values)."""
    import numpy as np

    bits = values.view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def round_float32(values: "np.ndarray", code: str, out: "np.ndarray") -> None:
    """Write float32 ``values`` rounded once (nearest even) to a float code into the raw bytes
    ``out`` (uint8, ``len(values) * itemsize(code)`` long)."""
    import numpy as np

    if code == "BF16":
        out.view(np.uint16)[:] = bfloat16_bits(values)
        return
    target = out.view(NUMPY_FLOATS[code])
    with np.errstate(over="ignore"):
        np.copyto(target, values, casting="same_kind")
