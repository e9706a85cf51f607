"""Align base, harmful and target checkpoints by tensor name and decide, before reading any
data, what happens to every tensor of the output.

Every mismatch (a tensor missing from one model, shapes that differ outside the vocabulary rows,
a float tensor in one model that is an integer in another) is collected and reported in one error,
so that a user learns about all of them at once and no work is wasted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ckptops.checkpoint.dtypes import FLOAT_CODES
from ckptops.checkpoint.header import TensorInfo
from ckptops.checkpoint.resolve import Checkpoint
from ckptops.errors import MismatchError, UsageError
from ckptops.hdr.layers import layer_index

SCOPES = ("global", "layer", "tensor")

#: tensors whose first dimension is the vocabulary (rows may differ between models)
_VOCAB_RE = re.compile(r"(embed_tokens|embed_in|embed_out|wte|word_embeddings|tok_embeddings|lm_head|^output)\.weight$")


@dataclass
class TensorTask:
    """What to do with one output tensor.

    ``action`` is ``"hdr"`` (theta_t - scale * mask * tau over the first ``numel`` elements, the
    rest copied from the target) or ``"copy"`` (the target's values, converted to ``out_dtype``).
    ``group`` names the top-k selection scope the tensor belongs to.
    """

    name: str
    target: TensorInfo
    out_dtype: str
    action: str
    reason: str = ""
    base: TensorInfo | None = None
    harmful: TensorInfo | None = None
    numel: int = 0  # elements taking part in HDR (the common vocabulary rows for resized tensors)
    group: str | None = None


@dataclass
class Plan:
    """The tasks in output order, the selection groups and their sizes, and what was skipped."""

    tasks: list[TensorTask]
    groups: dict[str, int] = field(default_factory=dict)  # group -> number of scalars selected over
    target_only: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    @property
    def hdr_tasks(self) -> list[TensorTask]:
        return [t for t in self.tasks if t.action == "hdr"]


def compile_excludes(exclude) -> list[re.Pattern]:
    """``--exclude`` patterns compiled; a bad one is a usage error (a recipe checks them early)."""
    try:
        return [re.compile(p) for p in exclude]
    except re.error as exc:
        raise UsageError(f"--exclude: bad regular expression ({exc})") from None


def make_plan(
    base: Checkpoint,
    harmful: Checkpoint,
    target: Checkpoint,
    *,
    scope: str = "global",
    exclude: list[str] | tuple[str, ...] = (),
    layers: frozenset[int] | None = None,
    out_dtype: str | None = None,
) -> Plan:
    """Align the three checkpoints; raise MismatchError listing every problem found."""
    if scope not in SCOPES:
        raise UsageError(f"--scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    patterns = compile_excludes(exclude)

    problems: list[str] = []
    tasks: list[TensorTask] = []
    plan = Plan(tasks)
    for name, t_info in target.tensors.items():
        b_info, h_info = base.tensors.get(name), harmful.tensors.get(name)
        dtype = out_dtype if (out_dtype and t_info.dtype in FLOAT_CODES) else t_info.dtype
        task = TensorTask(name, t_info, dtype, "copy")
        tasks.append(task)
        if b_info is None and h_info is None:
            task.reason = "only in target"
            plan.target_only.append(name)
            continue
        if b_info is None or h_info is None:
            missing = "base" if b_info is None else "harmful"
            problems.append(f"{name} is missing from {missing} ({(base if b_info is None else harmful).ref})")
            continue
        floats = [i.dtype in FLOAT_CODES for i in (b_info, h_info, t_info)]
        if not all(floats):
            if any(floats):
                problems.append(f"{name} dtypes {b_info.dtype}/{h_info.dtype}/{t_info.dtype} (base/harmful/target) mix float and non-float")
            else:
                task.reason = "not floating point"
            continue
        numel = _common_numel(name, b_info, h_info, t_info, problems)
        if numel is None:
            continue
        if numel != t_info.numel or b_info.shape != t_info.shape or h_info.shape != t_info.shape:
            plan.resized.append(name)
        task.base, task.harmful, task.numel = b_info, h_info, numel
        if any(p.search(name) for p in patterns):
            task.reason = "excluded"
            continue
        layer = layer_index(name)
        if layers is not None and (layer is None or layer not in layers):
            task.reason = "outside --layers"
            continue
        task.action = "hdr"
        task.group = "all" if scope == "global" else (
            f"layer {layer}" if scope == "layer" and layer is not None else name
        )
        plan.groups[task.group] = plan.groups.get(task.group, 0) + numel

    target_names = set(target.tensors)
    for label, ckpt in (("base", base), ("harmful", harmful)):
        extra = [n for n in ckpt.tensors if n not in target_names]
        if extra:
            problems.append(f"{len(extra)} tensor(s) of {label} are missing from target: {', '.join(extra[:5])}")
    if problems:
        shown = "; ".join(problems[:8])
        more = f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise MismatchError(f"the checkpoints do not line up: {shown}{more}")
    if layers is not None and not plan.hdr_tasks:
        raise UsageError(f"--layers {sorted(layers)} matches no tensor of the target")
    return plan


def _common_numel(name: str, b: TensorInfo, h: TensorInfo, t: TensorInfo, problems: list[str]) -> int | None:
    """Elements processed: all of them, or the leading common vocabulary rows of a resized table."""
    if b.shape == h.shape == t.shape:
        return t.numel
    shapes = f"{list(b.shape)}/{list(h.shape)}/{list(t.shape)} (base/harmful/target)"
    same_rank = len(b.shape) == len(h.shape) == len(t.shape) >= 1
    if same_rank and b.shape[1:] == h.shape[1:] == t.shape[1:] and _VOCAB_RE.search(name):
        rows = min(b.shape[0], h.shape[0], t.shape[0])
        return rows * math.prod(t.shape[1:])
    problems.append(f"{name} has shapes {shapes}")
    return None
