"""The per-chunk kernels of the fused path: the C loops of :mod:`fused` and a little numpy.

Same interface and same bits as :mod:`kernels_torch`, without torch: inputs are read as they are
stored (bfloat16 stays raw; float16/float64 are converted to float32 by numpy, exactly), the
selection counts and the update run in one C loop each, and the result is rounded straight into
the output buffer. Only a float16 output (numpy rounds it, to nearest even like torch) and a
``--dtype`` conversion of an unchanged tensor take a second step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ckptops.checkpoint.dtypes import itemsize
from ckptops.errors import TensorValueError
from ckptops.hdr import fused, select
from ckptops.hdr.chunks import Chunk, WorkerBuffers
from ckptops.hdr.nonfinite import nonfinite_error

if TYPE_CHECKING:
    from ckptops.checkpoint.writer import ShardWriter
    from ckptops.hdr.engine import BandTally, Models
    from ckptops.hdr.plan import TensorTask

#: how the run report names this path
PATH_NAME = "fused C loops"


def _read_pair(chunk: Chunk, buf: WorkerBuffers, models: Models):
    """(harmful bytes, its kind, base bytes, its kind) of the chunk, in ``buf.a``/``buf.b``."""
    task: TensorTask = chunk.task
    h, h_bf16 = buf.stage.read_native(models.files, models.harmful, task.harmful, chunk.start, chunk.stop, buf.a_np)
    b, b_bf16 = buf.stage.read_native(models.files, models.base, task.base, chunk.start, chunk.stop, buf.b_np)
    return h, int(h_bf16), b, int(b_bf16)


def band_kernel(models: Models, bands: list[tuple[int, int]]):
    """Count |tau| against each band ``(lo, size)`` into its :class:`BandTally` (histogram and
    per-tensor peaks); the chunk is read once for all of them."""
    def kernel(chunk: Chunk, buf: WorkerBuffers, tallies: list[BandTally]) -> None:
        pair = _read_pair(chunk, buf, models)
        name = chunk.task.name
        for (lo, size), tally in zip(bands, tallies):
            finite, peak = fused.band_count(*pair, chunk.size, lo, size, tally.hist)
            if not finite:
                raise nonfinite_error(chunk, models)
            tally.peaks[name] = max(peak, tally.peaks.get(name, -1))
    return kernel


def low_kernel(models: Models, top_bits: int):
    """Count |tau| against the band of one top bin (``select.LOW_BINS`` patterns)."""
    def kernel(chunk: Chunk, buf: WorkerBuffers, hist: np.ndarray) -> None:
        finite, _ = fused.band_count(*_read_pair(chunk, buf, models), chunk.size, top_bits, select.LOW_BINS, hist)
        if not finite:
            raise nonfinite_error(chunk, models)
    return kernel


def hdr_chunk(
    chunk: Chunk, buf: WorkerBuffers, models: Models, writer: ShardWriter, shrink: float | None, scale: float,
    tensor_changed: bool | None = None, sums: np.ndarray | None = None,
) -> int:
    """Write one chunk of theta_t - scale * hardshrink(tau, shrink); returns 1 if any value
    changed, else 0 (``tensor_changed``, when the selection pass knows it, is used instead).
    ``sums`` (float64[5]) gets the chunk's drift sums added, in the same loop."""
    task: TensorTask = chunk.task
    t, t_bf16 = buf.stage.read_native(models.files, models.target, task.target, chunk.start, chunk.stop, buf.c_np)
    changed = _apply_and_write(chunk, buf, models, writer, _read_pair(chunk, buf, models), t, t_bf16, shrink, scale,
                               sums)
    return int(changed if tensor_changed is None else tensor_changed)


def band_apply_chunk(chunk: Chunk, buf: WorkerBuffers, models: Models, writer: ShardWriter, lo: int, size: int,
                     shift: int, hist: np.ndarray, shrink: float | None, scale: float, record,
                     sums: np.ndarray | None = None) -> int:
    """The one-read pass over one chunk (see :mod:`ckptops.hdr.one_read`): count |tau| against
    the band ``[lo, lo + size)`` into ``hist`` (below; in-band, ``2**shift`` patterns a counter;
    above), hand every in-band value to
    ``record(chunk, indices, taus, targets, bases)``, and write theta_t - scale * hardshrink(tau,
    shrink) (adding the drift sums to ``sums`` when given, with that mask). Returns the chunk's
    peak (see :func:`select.add_band_counts`)."""
    task: TensorTask = chunk.task
    n = chunk.size
    t, t_bf16 = buf.stage.read_native(models.files, models.target, task.target, chunk.start, chunk.stop, buf.c_np)
    pair = _read_pair(chunk, buf, models)
    idx, taus, targets, bases = buf.records()
    finite, peak, found = fused.band_collect(*pair, t, int(t_bf16), n, lo, size, shift, hist, idx, taus,
                                             targets, bases)
    if not finite:
        raise nonfinite_error(chunk, models)
    if found:
        record(chunk, idx[:found], taus[:found], targets[:found], bases[:found])
    _apply_and_write(chunk, buf, models, writer, pair, t, t_bf16, shrink, scale, sums)
    return peak


def _apply_and_write(chunk: Chunk, buf: WorkerBuffers, models: Models, writer: ShardWriter, pair, t, t_bf16,
                     shrink: float | None, scale: float, sums: np.ndarray | None = None) -> bool:
    task: TensorTask = chunk.task
    n = chunk.size
    out_bf16 = task.out_dtype == "BF16"
    finite, changed = fused.apply(*pair, t, int(t_bf16), n, shrink, scale, buf.out.view, int(out_bf16), sums)
    if not finite:
        raise nonfinite_error(chunk, models, "theta_t - scale * tau")
    if task.out_dtype == "F16":
        write_f32(buf.out.raw_np_as("F32", n), task, chunk.start, buf, writer, into=buf.stage)
    else:
        size = itemsize(task.out_dtype)
        writer.write(task.name, chunk.start * size, buf.out.view[: n * size])
    return changed


def convert_chunk(chunk: Chunk, buf: WorkerBuffers, models: Models, writer: ShardWriter) -> None:
    """Target values converted to another float type (``--dtype``): float32 and float16 with
    numpy; a bfloat16 output goes through the fused update with nothing selected."""
    task: TensorTask = chunk.task
    n = chunk.size
    if task.out_dtype == "BF16":
        t, t_bf16 = buf.stage.read_native(models.files, models.target, task.target, chunk.start, chunk.stop, buf.c_np)
        zeros = buf.a_np[:n]
        zeros.fill(0.0)
        finite, _ = fused.apply(zeros, 0, zeros, 0, t, int(t_bf16), n, 0.0, 0.0, buf.out.view, 1)
        if not finite:
            raise nonfinite_error(chunk, models)
        writer.write(task.name, chunk.start * 2, buf.out.view[: 2 * n])
        return
    buf.stage.read_f32(models.files, models.target, task.target, chunk.start, chunk.stop, buf.c_np)
    values = buf.c_np[:n]
    if not np.isfinite(values).all():
        raise nonfinite_error(chunk, models)
    write_f32(values, task, chunk.start, buf, writer)


def write_f32(result: np.ndarray, task: TensorTask, start: int, buf: WorkerBuffers, writer: ShardWriter,
              into=None) -> None:
    """Write float32 values as float32, or rounded to float16 (nearest even) with an overflow
    check, at the tensor's offset."""
    n = result.shape[0]
    if task.out_dtype == "F32":
        writer.write(task.name, start * 4, memoryview(result.view(np.uint8)))
        return
    out = (into or buf.out).raw_np_as("F16", n)
    with np.errstate(over="ignore"):
        np.copyto(out, result, casting="same_kind")
    if not np.isfinite(out).all():
        raise TensorValueError(f"tensor {task.name!r}: the result does not fit F16 (overflow to Inf); try --dtype float32")
    writer.write(task.name, start * 2, memoryview(out.view(np.uint8)))
