"""Every choice of a ``sanitize`` run in one validated object.

Why one object: the same choices feed the passes, the ``parameters`` block of ``ckptops.json``
and of the model card, and the ``[hdr]`` section of a recipe. Validating and normalising them
once, here, means the four can never disagree and no pass re-checks an option.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

from ckptops import __version__
from ckptops.checkpoint.dtypes import DTYPE_NAMES
from ckptops.errors import UsageError
from ckptops.hdr.chunks import WorkerBuffers
from ckptops.hdr.layers import format_layers, parse_layers
from ckptops.hdr.plan import SCOPES
from ckptops.units import parse_size

#: resident memory before any buffer: ~250 MiB with torch imported (the torch path), less
#: without (the fused path); chunks use the rest
BASELINE_RSS = 320 << 20
DEFAULT_CHUNK = 1 << 20


def chunk_for_memory(max_memory: int, workers: int) -> int:
    """Elements per chunk so that all workers' buffers fit beside the interpreter in max_memory."""
    room = max_memory - BASELINE_RSS
    if room < 16 << 20:
        raise UsageError(
            f"--max-memory {max_memory >> 20} MiB is too small: ckptops needs about {(BASELINE_RSS >> 20) + 16} MiB at least"
        )
    chunk = room // (4 * workers * WorkerBuffers.bytes_per_element())
    return int(max(1 << 12, min(DEFAULT_CHUNK, chunk)))


@dataclass
class SanitizeOptions:
    """What to compute and how (see :func:`ckptops.sanitize` for the meaning of each field).

    Constructing one validates it: a bad value raises :class:`ckptops.errors.UsageError` naming
    the command-line option. Loose inputs are normalised: ``layers`` ``"4-6"`` becomes a
    frozenset, sizes like ``"1GiB"`` become byte counts, ``dtype`` None becomes ``"auto"``.

    Example::

        options = SanitizeOptions(top_k=0.05, scale=2.0, scope="layer", max_memory="512MiB")
        ckptops.sanitize("base/", "harmful/", "target/", "out/", options=options)
    """

    # what HDR computes
    top_k: float = 0.10
    scale: float = 3.0
    scope: str = "global"
    exclude: tuple[str, ...] = ()
    layers: frozenset[int] | None = None
    edit_area: str | None = None
    dtype: str = "auto"
    # how the run goes
    max_memory: int = 1 << 30
    shard_size: int | None = None
    workers: int | None = None
    chunk_elements: int | None = None
    low_disk: bool = False
    #: global/layer scope: select and apply in one read of the inputs (False: the two-pass engine)
    one_read: bool = True
    hash_inputs: bool = False
    progress: bool | None = None
    # the output
    overwrite: bool = False
    force: bool = False
    title: str | None = None
    push_to_hub: str | None = None
    private: bool = False
    branch: str | None = None
    commit_message: str | None = None

    def __post_init__(self) -> None:
        top_k, scale = self.top_k, self.scale
        if isinstance(top_k, bool) or not isinstance(top_k, (int, float)) or not math.isfinite(top_k) \
                or not 0 < top_k <= 1:
            raise UsageError(f"--top-k must be a fraction in (0, 1] (0.10 keeps the largest 10%), got {top_k!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise UsageError(f"--scale must be a finite number, got {scale!r}")
        if self.scope not in SCOPES:
            raise UsageError(f"--scope must be one of {', '.join(SCOPES)}, not {self.scope!r}")
        self.dtype = "auto" if self.dtype is None else self.dtype
        if self.dtype != "auto" and str(self.dtype).lower() not in DTYPE_NAMES:
            raise UsageError(f"--dtype must be auto, bfloat16, float16 or float32, not {self.dtype!r}")
        self.exclude = tuple(self.exclude)
        self.layers = parse_layers(self.layers) if not isinstance(self.layers, frozenset) else self.layers
        self.max_memory = parse_size(self.max_memory, "--max-memory")
        if self.shard_size is not None:
            self.shard_size = parse_size(self.shard_size, "--shard-size")
        if self.edit_area is not None and self.edit_area != "auto":
            raise UsageError(f"--edit-area must be 'auto', not {self.edit_area!r}")
        if self.edit_area is not None and self.layers is not None:
            raise UsageError("give --layers or --edit-area auto, not both")
        if self.push_to_hub is None and (self.private or self.branch or self.commit_message):
            raise UsageError("--private, --branch and --commit-message only apply with --push-to-hub")
        self.chunk  # noqa: B018 - a --max-memory too small for the buffers is a usage error now

    @property
    def chunk(self) -> int:
        """Elements per work chunk: ``chunk_elements``, else what ``max_memory`` allows."""
        return self.chunk_elements or chunk_for_memory(self.max_memory, self.worker_count)

    @property
    def out_code(self) -> str | None:
        """The safetensors dtype code of the output (``"BF16"`` ...), None for the target's own."""
        return None if self.dtype == "auto" else DTYPE_NAMES[str(self.dtype).lower()]

    @property
    def worker_count(self) -> int:
        return self.workers or min(2, os.cpu_count() or 1)

    def to_parameters(self, layers: frozenset[int] | None = None) -> dict:
        """The ``parameters`` block of ``ckptops.json`` and the model card. ``layers``: the layer
        set the run used (the edit area found by ``edit_area="auto"``), default the option's."""
        used = layers if layers is not None else self.layers
        return {
            "method": "harm-direction-removal",
            "top_k": self.top_k,
            "scale": self.scale,
            "scope": self.scope,
            "exclude": list(self.exclude),
            "layers": format_layers(used) if used is not None else "all",
            "edit_area": "auto" if self.edit_area is not None else "",
            "dtype": self.dtype,
            "ckptops_version": __version__,
        }

    def to_recipe(self) -> dict:
        """The ``[hdr]`` section of a recipe that repeats these choices (see :mod:`ckptops.recipe`)."""
        return {
            "top_k": self.top_k,
            "scale": self.scale,
            "scope": self.scope,
            "exclude": list(self.exclude),
            "layers": format_layers(self.layers) if self.layers is not None else "",
            "edit_area": self.edit_area or "",
            "dtype": self.dtype,
            "max_memory": str(self.max_memory),
            "shard_size": str(self.shard_size) if self.shard_size is not None else "",
        }

    @classmethod
    def from_recipe(cls, hdr: dict, **run: object) -> "SanitizeOptions":
        """Options from a validated recipe's ``[hdr]`` section (empty strings mean "not set"),
        plus run-only choices (``progress``, ``force`` ...) as keywords."""
        return cls(top_k=hdr["top_k"], scale=hdr["scale"], scope=hdr["scope"], exclude=tuple(hdr["exclude"]),
                   layers=hdr["layers"] or None, edit_area=hdr["edit_area"] or None, dtype=hdr["dtype"],
                   max_memory=hdr["max_memory"], shard_size=hdr["shard_size"] or None, **run)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
