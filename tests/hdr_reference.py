"""An independent, in-memory Harm Direction Removal written from the formula (Safety Arithmetic's
Harm Direction Removal, Hazra et al., EMNLP 2024) for the tests.

It loads every tensor with ``safetensors.torch.load_file``, flattens the selection scope, takes
``kthvalue`` as the official code does, and rounds once. It shares no code with ckptops.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

LAYER = re.compile(r"\.layers\.(\d+)\.")


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def reference_hdr(base, harmful, target, *, top_k=0.10, scale=3.0, scope="global", exclude=(),
                  layers=None, out_dtype=None):
    """Return the expected output state dict."""
    tau, rows = {}, {}
    for name, t in target.items():
        if name not in base or name not in harmful:
            continue
        if any(re.search(p, name) for p in exclude):
            continue
        m = LAYER.search(name)
        if layers is not None and (m is None or int(m.group(1)) not in layers):
            continue
        r = min(base[name].shape[0], harmful[name].shape[0], t.shape[0]) if t.dim() else None
        rows[name] = r
        b = base[name][:r].float() if r is not None else base[name].float()
        h = harmful[name][:r].float() if r is not None else harmful[name].float()
        tau[name] = h - b
    groups: dict[str, list[str]] = {}
    for name in tau:
        if scope == "global":
            key = "all"
        elif scope == "layer":
            m = LAYER.search(name)
            key = f"layer {m.group(1)}" if m else name
        else:
            key = name
        groups.setdefault(key, []).append(name)
    thresholds = {}
    for key, names in groups.items():
        flat = torch.cat([tau[n].abs().flatten() for n in names])
        d = flat.numel()
        if top_k >= 1:
            thresholds[key] = None
            continue
        j = max(1, d - int(d * top_k))
        thresholds[key] = flat.kthvalue(j).values.item()
        for n in names:
            tau[n + "::thr"] = thresholds[key]
    out = {}
    for name, t in target.items():
        dtype = out_dtype if (out_dtype is not None and t.is_floating_point()) else t.dtype
        if name not in tau:
            out[name] = t.to(dtype)
            continue
        thr = tau.get(name + "::thr")
        v = tau[name]
        pruned = v if thr is None else torch.where(v.abs() >= thr, v, torch.zeros_like(v))
        full = t.float().clone()
        r = rows[name]
        full[:r] = full[:r] - scale * pruned
        out[name] = full.to(dtype)
    return out, thresholds


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}.get(a.dtype)
    if view is None:
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def read_index(folder: Path) -> dict:
    return json.loads((Path(folder) / "model.safetensors.index.json").read_text())
