"""Compare two checkpoints of one architecture, per decoder layer: how many values differ and by
how much. This finds the *edit area* of an edited model (paper Eqs. 11-13): every layer ``l``
where the edited model differs from its base, widened to ``l-1, l, l+1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ckptops.checkpoint.dtypes import FLOAT_CODES
from ckptops.checkpoint.reader import OpenFiles
from ckptops.checkpoint.resolve import Checkpoint, open_checkpoint
from ckptops.errors import MismatchError, TensorValueError
from ckptops.hdr.chunks import Chunk, WorkerBuffers, WorkerPool, single_threaded_torch, split
from ckptops.hdr.layers import format_layers, layer_index


@dataclass
class TensorDiff:
    name: str
    layer: int | None
    values: int
    differ: int = 0
    sum_sq: float = 0.0

    @property
    def norm(self) -> float:
        return math.sqrt(self.sum_sq)


@dataclass
class DiffReport:
    """Per-tensor and per-layer differences, and the edit area they imply."""

    tensors: list[TensorDiff]
    num_layers: int
    differing_layers: list[int] = field(default_factory=list)
    edit_area: list[int] = field(default_factory=list)
    other_tensors_differ: list[str] = field(default_factory=list)
    #: tensors in one model only, or with other shapes (a resized vocabulary, an added head):
    #: name -> why; a decoder layer holding one counts as differing
    not_compared: dict[str, str] = field(default_factory=dict)

    def by_layer(self) -> dict[int, tuple[int, int, float]]:
        """layer -> (values that differ, values, L2 norm of the difference)."""
        acc: dict[int, list[float]] = {}
        for t in self.tensors:
            if t.layer is None:
                continue
            a = acc.setdefault(t.layer, [0, 0, 0.0])
            a[0] += t.differ
            a[1] += t.values
            a[2] += t.sum_sq
        return {l: (int(a[0]), int(a[1]), math.sqrt(a[2])) for l, a in sorted(acc.items())}

    def to_dict(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "differing_layers": self.differing_layers,
            "edit_area": format_layers(self.edit_area) if self.edit_area else "",
            "other_tensors_differ": self.other_tensors_differ,
            "not_compared": self.not_compared,
            "layers": {str(l): {"values_differ": d, "values": n, "norm": nrm} for l, (d, n, nrm) in self.by_layer().items()},
            "tensors": {t.name: {"values_differ": t.differ, "norm": t.norm} for t in self.tensors if t.differ},
        }

    def format_text(self) -> str:
        lines = [f"{'layer':>5}  {'values differ':>15}  {'of':>12}  {'L2 norm of difference':>22}"]
        for layer, (differ, values, norm) in self.by_layer().items():
            lines.append(f"{layer:>5}  {differ:>15,}  {values:>12,}  {norm:>22.6g}")
        differ = [name for name in self.other_tensors_differ if name not in self.not_compared]
        if differ:
            lines.append(f"outside the layers: {', '.join(differ)} differ")
        if self.not_compared:
            shown = [f"{name} ({why})" for name, why in list(self.not_compared.items())[:5]]
            more = f" and {len(self.not_compared) - 5} more" if len(self.not_compared) > 5 else ""
            lines.append(f"not compared (in one model only, or other shapes): {', '.join(shown)}{more}")
        if self.differing_layers:
            lines.append(f"edited layers: {format_layers(self.differing_layers)}; edit area (l-1..l+1): {format_layers(self.edit_area)}")
        else:
            lines.append("no decoder layer differs")
        return "\n".join(lines)


def edit_area(differing: list[int], num_layers: int) -> list[int]:
    """Every differing layer widened by one on each side, clipped to the model."""
    area: set[int] = set()
    for layer in differing:
        area.update(l for l in (layer - 1, layer, layer + 1) if 0 <= l < num_layers)
    return sorted(area)


def diff_checkpoints(base: str | Checkpoint, edited: str | Checkpoint, *, workers: int = 2,
                     chunk: int = 1 << 20) -> DiffReport:
    """Stream both checkpoints and count, per tensor, the values that differ (bitwise)."""
    base = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    if not isinstance(edited, Checkpoint):
        from ckptops.checkpoint.lora import open_model  # BASE+ADAPTER: the adapter merged, as sanitize reads it

        edited = open_model(edited)
    for ckpt in (base, edited):
        if ckpt.root is not None and (ckpt.root / "adapter_config.json").is_file():
            raise MismatchError(f"{ckpt.ref}: is a LoRA adapter, not a model; diff compares two full checkpoints "
                                "of one architecture (merge the adapter into its base first)")
    # Only tensors both models hold with one shape are compared value by value; the others (a
    # resized vocabulary, an added head) are listed, as sanitize copies them, instead of refused.
    not_compared = {name: f"only in {edited.ref}" for name in edited.tensors if name not in base.tensors}
    not_compared.update({name: f"only in {base.ref}" for name in base.tensors if name not in edited.tensors})
    not_compared.update({name: f"shapes {list(base.tensors[name].shape)} / {list(info.shape)}"
                         for name, info in edited.tensors.items()
                         if name in base.tensors and base.tensors[name].shape != info.shape})
    compared = {name: info for name, info in edited.tensors.items() if name not in not_compared}
    if not compared:
        raise MismatchError(f"{edited.ref} and {base.ref} share no tensor of the same name and shape: nothing to compare")

    diffs = {n: TensorDiff(n, layer_index(n), info.numel) for n, info in compared.items()}
    files = OpenFiles()

    def work(chunk: Chunk, buf: WorkerBuffers, acc: dict) -> None:
        name = chunk.task
        a_info, b_info = edited.tensors[name], base.tensors[name]
        n = chunk.size
        if a_info.dtype in FLOAT_CODES and b_info.dtype in FLOAT_CODES:
            buf.stage.read_f32(files, edited, a_info, chunk.start, chunk.stop, buf.a)
            buf.stage.read_f32(files, base, b_info, chunk.start, chunk.stop, buf.b)
            delta = buf.a[:n].sub_(buf.b[:n])
            sum_sq = float(torch.dot(delta, delta))
            if not math.isfinite(sum_sq):  # name the file that holds it (the delta cannot tell)
                for ckpt, info in ((edited, a_info), (base, b_info)):
                    buf.stage.read_f32(files, ckpt, info, chunk.start, chunk.stop, buf.a)
                    if not bool(torch.isfinite(buf.a[:n]).all()):
                        raise TensorValueError(f"{ckpt.ref}: tensor {name!r} holds NaN or Inf values")
                raise TensorValueError(f"tensor {name!r}: the squared difference overflows float32 "
                                       f"({edited.ref} against {base.ref})")
            differ = int(torch.count_nonzero(delta))
        else:
            raw_a = bytes(buf.stage.read_raw(files, edited, a_info, chunk.start, chunk.stop))
            raw_b = bytes(buf.stage.read_raw(files, base, b_info, chunk.start, chunk.stop))
            differ, sum_sq = (0 if raw_a == raw_b else n), 0.0
        entry = acc.setdefault(name, [0, 0.0])
        entry[0] += differ
        entry[1] += sum_sq

    chunks = (c for name, info in compared.items() for c in split(name, 0, info.numel, chunk))
    with single_threaded_torch():
        pool = WorkerPool(workers, chunk)
        try:
            states = pool.run(chunks, work, dict)
        finally:
            pool.close()
            files.close()
    for state in states:
        for name, (differ, sum_sq) in state.items():
            diffs[name].differ += differ
            diffs[name].sum_sq += sum_sq
    layers = [i for i in map(layer_index, [*edited.tensors, *base.tensors]) if i is not None]
    num_layers = max(layers) + 1 if layers else 0
    changed_layers = {d.layer for d in diffs.values() if d.layer is not None and d.differ}
    changed_layers |= {i for i in map(layer_index, not_compared) if i is not None}  # a layer changed in shape
    differing = sorted(changed_layers)
    others = sorted({d.name for d in diffs.values() if d.layer is None and d.differ}
                    | {name for name in not_compared if layer_index(name) is None})
    return DiffReport(list(diffs.values()), num_layers, differing, edit_area(differing, num_layers), others,
                      not_compared)
