"""The per-chunk kernels of the torch path: preallocated buffers and in-place/``out=`` torch ops.

Used when the fused C loops are not built (no compiler at install time) or are switched off with
``CKPTOPS_NO_FUSED=1``; :mod:`kernels_fused` has the same interface and gives the same bits.
This module is imported only when the torch path runs: importing torch costs over a second.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ckptops.checkpoint.dtypes import itemsize
from ckptops.checkpoint.reader import byte_view
from ckptops.errors import TensorValueError
from ckptops.hdr import select
from ckptops.hdr.chunks import Chunk, WorkerBuffers, torch_for_workers
from ckptops.hdr.drift import add_chunk_sums
from ckptops.hdr.nonfinite import nonfinite_error

if TYPE_CHECKING:
    from ckptops.checkpoint.writer import ShardWriter
    from ckptops.hdr.engine import BandTally, Models
    from ckptops.hdr.plan import TensorTask

torch = torch_for_workers()

#: how the run report names this path
PATH_NAME = "torch ops"


def _tau(chunk: Chunk, buf: WorkerBuffers, models: Models):
    """tau = float32(theta_H) - float32(theta_b) for the chunk, in ``buf.a``."""
    task: TensorTask = chunk.task
    n = chunk.size
    buf.stage.read_f32(models.files, models.harmful, task.harmful, chunk.start, chunk.stop, buf.a)
    buf.stage.read_f32(models.files, models.base, task.base, chunk.start, chunk.stop, buf.b)
    tau = buf.a[:n]
    tau.sub_(buf.b[:n])
    return tau


def _all_finite(values) -> bool:
    """True when no NaN/Inf: a float32 sum is NaN/Inf if any term is (and weights never sum past
    3e38), and costs a fraction of ``isfinite().all()``; a non-finite sum is double-checked."""
    total = float(values.sum(dtype=torch.float32))
    if math.isfinite(total):
        return True
    return bool(torch.isfinite(values).all())


def _add_band_counts(tau, buf: WorkerBuffers, lo: int, size: int, hist: np.ndarray) -> int:
    """Count the bit patterns of |tau| against the band ``[lo, lo + size)`` and return the
    chunk's peak (see :func:`select.add_band_counts`); |tau| goes to ``buf.b``."""
    bits = torch.abs(tau, out=buf.b[: tau.numel()]).view(torch.int32).numpy()
    return select.add_band_counts(bits, lo, size, hist, buf.below, buf.inside)


def band_kernel(models: Models, bands: list[tuple[int, int]]):
    """Count |tau| against each band ``(lo, size)`` into its :class:`BandTally` (histogram and
    per-tensor peaks); the chunk is read once for all of them."""
    def kernel(chunk: Chunk, buf: WorkerBuffers, tallies: list[BandTally]) -> None:
        tau = _tau(chunk, buf, models)
        if not _all_finite(tau):
            raise nonfinite_error(chunk, models)
        name = chunk.task.name
        for (lo, size), tally in zip(bands, tallies):
            peak = _add_band_counts(tau, buf, lo, size, tally.hist)
            tally.peaks[name] = max(peak, tally.peaks.get(name, -1))
    return kernel


def low_kernel(models: Models, top_bits: int):
    """Count |tau| against the band of one top bin (``select.LOW_BINS`` patterns)."""
    def kernel(chunk: Chunk, buf: WorkerBuffers, hist: np.ndarray) -> None:
        _add_band_counts(_tau(chunk, buf, models), buf, top_bits, select.LOW_BINS, hist)
    return kernel


def hdr_chunk(
    chunk: Chunk, buf: WorkerBuffers, models: Models, writer: ShardWriter, shrink: float | None, scale: float,
    tensor_changed: bool | None = None, sums: np.ndarray | None = None,
) -> int:
    """Write one chunk of theta_t - scale * where(|tau| >= t, tau, +0), the mask being
    ``hardshrink(tau, shrink)``; returns 1 if any value changed, else 0 (exact per-group counts
    come from the selection histograms). ``tensor_changed``, when the selection pass knows it,
    saves looking at this chunk's values. ``sums`` (float64[5]) gets the chunk's drift sums
    added (numpy over the float32 buffers, before the update overwrites them)."""
    task: TensorTask = chunk.task
    tau = _tau(chunk, buf, models)
    buf.stage.read_f32(models.files, models.target, task.target, chunk.start, chunk.stop, buf.c)
    return _apply_and_write(chunk, buf, models, writer, tau, shrink, scale, tensor_changed, sums)


def band_apply_chunk(chunk: Chunk, buf: WorkerBuffers, models: Models, writer: ShardWriter, lo: int, size: int,
                     shift: int, hist: np.ndarray, shrink: float | None, scale: float, record,
                     sums: np.ndarray | None = None) -> int:
    """The one-read pass over one chunk (same contract as :func:`kernels_fused.band_apply_chunk`)."""
    task: TensorTask = chunk.task
    n = chunk.size
    tau = _tau(chunk, buf, models)
    if not _all_finite(tau):
        raise nonfinite_error(chunk, models)
    # |tau|'s bits in the key buffer: base stays in buf.b (records and drift sums read it)
    bits = buf.key_np[:n].view(np.int32)
    torch.abs(tau, out=torch.from_numpy(bits.view(np.float32)))
    below, inside = buf.below[:n], buf.inside[:n]
    np.less(bits, lo, out=below)
    np.less(bits, lo + size, out=inside)
    n_below, n_upto = int(np.count_nonzero(below)), int(np.count_nonzero(inside))
    hist[0] += n_below
    hist[-1] += n - n_upto
    buf.stage.read_f32(models.files, models.target, task.target, chunk.start, chunk.stop, buf.c)
    peak = lo + size if n_upto < n else lo - 1
    if n_upto > n_below:
        np.logical_xor(inside, below, out=inside)
        idx = np.flatnonzero(inside).astype(np.uint32)
        values = bits[idx]
        np.add.at(hist, 1 + ((values - lo) >> shift), 1)
        if n_upto == n:
            peak = int(values.max())
        record(chunk, idx, buf.a_np[idx], buf.c_np[idx], buf.b_np[idx])
    _apply_and_write(chunk, buf, models, writer, tau, shrink, scale, False, sums)
    return peak


def _apply_and_write(chunk: Chunk, buf: WorkerBuffers, models: Models, writer: ShardWriter, tau,
                     shrink: float | None, scale: float, tensor_changed: bool | None,
                     sums: np.ndarray | None = None) -> int:
    """theta_t (already in ``buf.c``, base in ``buf.b``) - scale * hardshrink(tau, shrink),
    rounded and written."""
    task: TensorTask = chunk.task
    n = chunk.size
    masked = tau
    if shrink is not None:
        # the key buffer takes the selection, so base stays in buf.b
        masked = torch.from_numpy(buf.key_np[:n].view(np.float32))
        torch.hardshrink(tau, shrink, out=masked)
    if sums is not None:
        tau_np = buf.a_np[:n]
        add_chunk_sums(sums, buf.c_np[:n], buf.b_np[:n], tau_np, tau_np if masked is tau else masked.numpy())
    if tensor_changed is None:
        low, high = torch.aminmax(masked)  # cheaper than masked.any(), and exact
        changed = int(bool(low < 0) or bool(high > 0))
    else:
        changed = int(tensor_changed)
    masked.mul_(scale)
    result = buf.c[:n]
    result.sub_(masked)
    if not _all_finite(result):
        raise nonfinite_error(chunk, models, "theta_t - scale * tau")
    write_f32(result, task, chunk.start, buf, writer)
    return changed


def convert_chunk(chunk: Chunk, buf: WorkerBuffers, models: Models, writer: ShardWriter) -> None:
    """Target values converted to another float type (``--dtype``), otherwise unchanged."""
    task: TensorTask = chunk.task
    result = buf.c[: chunk.size]
    buf.stage.read_f32(models.files, models.target, task.target, chunk.start, chunk.stop, buf.c)
    if not _all_finite(result):
        raise nonfinite_error(chunk, models)
    write_f32(result, task, chunk.start, buf, writer)


def write_f32(result, task: TensorTask, start: int, buf: WorkerBuffers, writer: ShardWriter) -> None:
    """Round a float32 tensor once to the output dtype (in ``buf.out``) and write it at the
    tensor's offset."""
    size = itemsize(task.out_dtype)
    if task.out_dtype == "F32":
        writer.write(task.name, start * size, byte_view(result))
        return
    out = buf.out.raw_as(task.out_dtype, result.numel())
    out.copy_(result)
    if task.out_dtype == "F16" and not bool(torch.isfinite(out).all()):
        raise TensorValueError(
            f"tensor {task.name!r}: the result does not fit {task.out_dtype} (overflow to Inf); try --dtype float32"
        )
    writer.write(task.name, start * size, byte_view(out))


__all__ = ["band_kernel", "low_kernel", "hdr_chunk", "band_apply_chunk", "convert_chunk", "write_f32"]
