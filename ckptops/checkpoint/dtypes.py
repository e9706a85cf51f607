"""The safetensors dtype codes ckptops understands, their sizes and torch equivalents.

Kept in one table so that header validation, reading, arithmetic and writing agree on what a dtype
code means. Only the four float codes take part in arithmetic; other tensors are copied unchanged.
"""

from __future__ import annotations

import torch

# code -> (itemsize in bytes, torch dtype)
SAFETENSORS_DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "F64": (8, torch.float64),
    "F32": (4, torch.float32),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "I64": (8, torch.int64),
    "I32": (4, torch.int32),
    "I16": (2, torch.int16),
    "I8": (1, torch.int8),
    "U8": (1, torch.uint8),
    "BOOL": (1, torch.bool),
}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[_code] = (torch.empty(0, dtype=getattr(torch, _name)).element_size(),
                                     getattr(torch, _name))

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


def torch_dtype(code: str) -> torch.dtype:
    return SAFETENSORS_DTYPES[code][1]
