"""The two streaming jobs of HDR: find each scope's exact threshold, then write
theta_t - scale * (|tau| >= t) * tau for every tensor, chunk by chunk.

Each chunk runs on one of two paths that give the same bits: the fused C loops of :mod:`fused`
when the extension is built, else preallocated buffers and in-place/``out=`` torch ops (no fresh
allocations per chunk). Arithmetic is float32 throughout; the result is rounded once
(round-to-nearest-even) to the output dtype. Unselected entries subtract exactly +0, so the
target's bits are kept there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ckptops.checkpoint.dtypes import FLOAT_CODES, itemsize
from ckptops.checkpoint.reader import OpenFiles, Staging, byte_view
from ckptops.checkpoint.resolve import Checkpoint
from ckptops.checkpoint.writer import ShardWriter
from ckptops.errors import TensorValueError
from ckptops.hdr import fused, select
from ckptops.hdr.chunks import Chunk, WorkerBuffers, WorkerPool, split
from ckptops.hdr.plan import Plan, TensorTask


@dataclass
class Models:
    """The three inputs and the open file handles shared by all workers."""

    base: Checkpoint
    harmful: Checkpoint
    target: Checkpoint
    files: OpenFiles = field(default_factory=OpenFiles)


@dataclass
class Selection:
    """The threshold of one scope group (None: keep everything) and how many values it keeps;
    ``changed`` names the group's tensors that have a selected non-zero value, when the selection
    pass could tell (then the apply pass need not look), else None."""

    threshold: float | None
    count: int
    kept: int
    changed: frozenset[str] | None = None


@dataclass
class BandTally:
    """One worker's band-pass result: the band histogram and each tensor's peak bit pattern
    (see :func:`select.add_band_counts`)."""

    hist: np.ndarray
    peaks: dict[str, int] = field(default_factory=dict)


def _tau(chunk: Chunk, buf: WorkerBuffers, models: Models) -> torch.Tensor:
    """tau = float32(theta_H) - float32(theta_b) for the chunk, in ``buf.a``."""
    task: TensorTask = chunk.task
    n = chunk.size
    buf.stage.read_f32(models.files, models.harmful, task.harmful, chunk.start, chunk.stop, buf.a)
    buf.stage.read_f32(models.files, models.base, task.base, chunk.start, chunk.stop, buf.b)
    tau = buf.a[:n]
    tau.sub_(buf.b[:n])
    return tau


def _abs_bits(tau: torch.Tensor, buf: WorkerBuffers) -> tuple[torch.Tensor, torch.Tensor]:
    """|tau| as int32 bit patterns (in ``buf.b``) and their top-16-bit keys (in ``buf.key``)."""
    n = tau.numel()
    magnitude = torch.abs(tau, out=buf.b[:n])
    bits = magnitude.view(torch.int32)
    keys = torch.bitwise_right_shift(bits, select.TOP_BITS_SHIFT, out=buf.key[:n])
    return bits, keys


def _nonfinite_error(chunk: Chunk, models: Models, result: str = "tau") -> TensorValueError:
    """Find which input holds NaN/Inf in this chunk and name its file and tensor."""
    task: TensorTask = chunk.task
    probe = torch.empty(chunk.size, dtype=torch.float32)
    stage = Staging(chunk.size)
    for label, ckpt, info in (
        ("target", models.target, task.target),
        ("base", models.base, task.base),
        ("harmful", models.harmful, task.harmful),
    ):
        if info is None or info.dtype not in FLOAT_CODES or chunk.stop > info.numel:
            continue
        stage.read_f32(models.files, ckpt, info, chunk.start, chunk.stop, probe)
        bad = (~torch.isfinite(probe)).nonzero()
        if bad.numel():
            where = models.files.fd(ckpt, info.shard)[1]
            return TensorValueError(
                f"{where}: tensor {task.name!r} ({label}) holds NaN or Inf (first at element {chunk.start + int(bad[0])})"
            )
    return TensorValueError(f"tensor {task.name!r}: {result} overflows float32 (inputs are finite but too large)")


def _group_chunks(tasks: list[TensorTask], chunk: int):
    for task in tasks:
        yield from split(task, 0, task.numel, chunk)


def select_thresholds(
    plan: Plan,
    models: Models,
    pool: WorkerPool,
    top_k: float,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Selection]:
    """The exact threshold of every selection group (one or two streaming passes per group)."""
    by_group: dict[str, list[TensorTask]] = {}
    for task in plan.hdr_tasks:
        by_group.setdefault(task.group, []).append(task)
    result: dict[str, Selection] = {}
    for group, tasks in by_group.items():
        count = plan.groups[group]
        if top_k >= 1.0:
            result[group] = Selection(None, count, count)
        else:
            result[group] = _select_group(tasks, count, select.kth_rank(count, top_k), models, pool, progress)
    return result


#: a pass-1 band of this many top-16-bit bins (about +-1.5% in value) around the sampled estimate
BAND_BINS = 4
#: groups smaller than this many chunks skip the sampling step (two plain passes are cheap)
MIN_CHUNKS_FOR_BAND = 8


def _select_group(tasks: list[TensorTask], count: int, rank: int, models: Models, pool: WorkerPool,
                  progress: Callable[[int], None] | None) -> Selection:
    """Radix-select the ``rank``-th smallest |tau| of one group, exactly.

    Fast path (one pass): a sample (1/64 of the values) estimates where the threshold
    lies; one pass then counts, exactly, how many |tau| fall below a narrow band of bit patterns
    around the estimate, above it, and at every single bit pattern inside it. If the rank lands
    inside the band, that pins the threshold. Otherwise (a poor sample; never seen in practice)
    the general two-pass radix select runs: top 16 bits of every value, then the low 15 bits of
    the values in the threshold's top bin.
    """
    if sum(-(-t.numel // pool.chunk) for t in tasks) >= MIN_CHUNKS_FOR_BAND:
        lo, size = estimate_band(tasks, count, rank, models, pool)
        kernel = (_fused_band_kernel if fused.enabled() else _count_band_kernel)(models, lo, size)
        states = pool.run(_group_chunks(tasks, pool.chunk), kernel,
                          lambda: BandTally(np.zeros(size + 2, dtype=np.int64)), _selection_done(progress))
        hist = torch.from_numpy(sum(state.hist for state in states))
        below, inside = int(hist[0]), hist[1: size + 1]
        if below < rank <= below + int(inside.sum()):
            position, _ = select.locate(inside, rank - below)
            threshold = select.bits_to_float(lo + position)
            # a tensor changes when some |tau| >= t (> 0: a zero tau changes nothing)
            reach = max(lo + position, 1)
            changed = frozenset(name for state in states for name, peak in state.peaks.items() if peak >= reach)
            return Selection(threshold, count, count - below - int(inside[:position].sum()), changed)
    hist_top = count_top_pass(tasks, models, pool, progress)
    top, rank_in_bin = select.locate(hist_top, rank)
    hist_low = count_low_pass(tasks, models, pool, top << select.TOP_BITS_SHIFT, progress)
    return finish_selection(hist_top, top, rank_in_bin, hist_low, count)


def finish_selection(hist_top: torch.Tensor, top: int, rank_in_bin: int, hist_low: torch.Tensor,
                     count: int) -> Selection:
    """The exact threshold from the top-bit histogram and the low-bit histogram of its bin."""
    low, _ = select.locate(hist_low, rank_in_bin)
    threshold = select.bits_to_float((top << select.TOP_BITS_SHIFT) | low)
    return Selection(threshold, count, count - select.count_below(hist_top, top, hist_low, low))


def _selection_done(progress: Callable[[int], None] | None) -> Callable[[Chunk], None] | None:
    if progress is None:
        return None

    def done(c: Chunk) -> None:
        progress(c.size * (itemsize(c.task.base.dtype) + itemsize(c.task.harmful.dtype)))
    return done


def estimate_band(tasks: list[TensorTask], count: int, rank: int, models: Models,
                  pool: WorkerPool) -> tuple[int, int]:
    """(first bit pattern, width) of the band of BAND_BINS top bins around the threshold that a
    sample predicts: the first quarter of every 16th chunk (1/64 of the values, in pieces large
    enough that per-piece overhead stays small)."""
    piece = max(pool.chunk // 4, 256)
    sample = (Chunk(c.task, c.start, min(c.start + piece, c.stop))
              for i, c in enumerate(_group_chunks(tasks, pool.chunk)) if i % 16 == 0)
    hists = pool.run(sample, _count_top_kernel(models), lambda: torch.zeros(select.TOP_BINS, dtype=torch.int64))
    hist_sample = torch.stack(hists).sum(0)
    sampled = int(hist_sample.sum())
    estimate, _ = select.locate(hist_sample, max(1, min(sampled, round(rank * sampled / count))))
    first = max(0, min(estimate - BAND_BINS // 2 + 1, select.TOP_BINS - BAND_BINS))
    return first << select.TOP_BITS_SHIFT, BAND_BINS << select.TOP_BITS_SHIFT


def count_top_pass(tasks: list[TensorTask], models: Models, pool: WorkerPool,
                   progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Pass 1 over ``tasks``: the top-16-bit histogram of |tau|. Histograms of disjoint task
    lists add up, so a caller may run it piece by piece."""
    states = pool.run(_group_chunks(tasks, pool.chunk), _count_top_kernel(models),
                      lambda: torch.zeros(select.TOP_BINS, dtype=torch.int64), _selection_done(progress))
    return torch.stack(states).sum(0) if states else torch.zeros(select.TOP_BINS, dtype=torch.int64)


def count_low_pass(tasks: list[TensorTask], models: Models, pool: WorkerPool, top_bits: int,
                   progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Pass 2 over ``tasks``: exact counts of the low 15 bits of the values in bin ``top_bits``."""
    states = pool.run(_group_chunks(tasks, pool.chunk), _count_low_kernel(models, top_bits),
                      lambda: np.zeros(select.LOW_BINS + 2, dtype=np.int64), _selection_done(progress))
    return torch.from_numpy(sum(states)[1: select.LOW_BINS + 1].copy()) if states \
        else torch.zeros(select.LOW_BINS, dtype=torch.int64)


def _add_band_counts(tau: torch.Tensor, buf: WorkerBuffers, lo: int, size: int, hist: np.ndarray) -> int:
    """Count the bit patterns of |tau| against the band ``[lo, lo + size)`` and return the
    chunk's peak (see :func:`select.add_band_counts`); |tau| goes to ``buf.b``."""
    bits = torch.abs(tau, out=buf.b[: tau.numel()]).view(torch.int32).numpy()
    return select.add_band_counts(bits, lo, size, hist, buf.below, buf.inside)


def _count_top_kernel(models: Models):
    def kernel(chunk: Chunk, buf: WorkerBuffers, hist: torch.Tensor) -> None:
        _, keys = _abs_bits(_tau(chunk, buf, models), buf)
        counts = torch.bincount(keys, minlength=select.TOP_BINS)
        if counts[select.NONFINITE_KEY:].any():
            raise _nonfinite_error(chunk, models)
        hist += counts
    return kernel


def _count_band_kernel(models: Models, lo: int, size: int):
    def kernel(chunk: Chunk, buf: WorkerBuffers, tally: BandTally) -> None:
        tau = _tau(chunk, buf, models)
        if not _all_finite(tau):
            raise _nonfinite_error(chunk, models)
        peak = _add_band_counts(tau, buf, lo, size, tally.hist)
        name = chunk.task.name
        tally.peaks[name] = max(peak, tally.peaks.get(name, -1))
    return kernel


def _fused_band_kernel(models: Models, lo: int, size: int):
    """:func:`_count_band_kernel` in one C loop over the raw inputs (see :mod:`fused`)."""
    def kernel(chunk: Chunk, buf: WorkerBuffers, tally: BandTally) -> None:
        task: TensorTask = chunk.task
        h, h_bf16 = buf.stage.read_native(models.files, models.harmful, task.harmful, chunk.start, chunk.stop, buf.a)
        b, b_bf16 = buf.stage.read_native(models.files, models.base, task.base, chunk.start, chunk.stop, buf.b)
        finite, peak = fused.band_count(h, int(h_bf16), b, int(b_bf16), chunk.size, lo, size, tally.hist)
        if not finite:
            raise _nonfinite_error(chunk, models)
        tally.peaks[task.name] = max(peak, tally.peaks.get(task.name, -1))
    return kernel


def _count_low_kernel(models: Models, top_bits: int):
    def kernel(chunk: Chunk, buf: WorkerBuffers, hist: np.ndarray) -> None:
        _add_band_counts(_tau(chunk, buf, models), buf, top_bits, select.LOW_BINS, hist)
    return kernel


@dataclass
class ApplyCounts:
    """Per-worker tallies: how many chunks of each HDR tensor changed at least one value."""

    kept: dict[str, int] = field(default_factory=dict)


def apply_all(
    plan: Plan,
    models: Models,
    pool: WorkerPool,
    writer: ShardWriter,
    selections: dict[str, Selection],
    scale: float,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Write every output tensor; returns, per HDR tensor, how many of its chunks changed."""

    def chunks():
        for task in plan.tasks:
            if task.action == "hdr":
                yield from split(task, 0, task.numel, pool.chunk)
                yield from split(("tail", task), task.numel, task.target.numel, pool.chunk)
            else:
                yield from split(("tail", task), 0, task.target.numel, pool.chunk)

    def work(chunk: Chunk, buf: WorkerBuffers, counts: ApplyCounts) -> None:
        if isinstance(chunk.task, tuple):
            task = chunk.task[1]
            _copy_chunk(Chunk(task, chunk.start, chunk.stop), buf, models, writer)
            read = chunk.size * itemsize(task.target.dtype)
        else:
            task = chunk.task
            changed = selections[task.group].changed
            counts.kept[task.name] = counts.kept.get(task.name, 0) + _hdr_chunk(
                chunk, buf, models, writer, shrink[task.group], scale,
                None if changed is None else task.name in changed,
            )
            read = chunk.size * sum(itemsize(i.dtype) for i in (task.target, task.base, task.harmful))
        if progress:
            progress(read)

    # hardshrink keeps x where |x| > lambda and writes +0.0 elsewhere, in one pass; with lambda
    # the float just below t, |x| > lambda is exactly |x| >= t (ties kept). None: keep all.
    shrink = {group: select.float_before(s.threshold) if s.threshold is not None and s.threshold > 0.0 else None
              for group, s in selections.items()}
    states = pool.run(chunks(), work, ApplyCounts)
    kept: dict[str, int] = {}
    for state in states:
        for name, value in state.kept.items():
            kept[name] = kept.get(name, 0) + value
    return kept


def _hdr_chunk(
    chunk: Chunk, buf: WorkerBuffers, models: Models, writer: ShardWriter, shrink: float | None, scale: float,
    tensor_changed: bool | None = None,
) -> int:
    """Write one chunk of theta_t - scale * where(|tau| >= t, tau, +0), the mask being
    ``hardshrink(tau, shrink)``; returns 1 if any value changed, else 0 (exact per-group counts
    come from the selection histograms). ``tensor_changed``, when the selection pass knows it,
    saves looking at this chunk's values."""
    if fused.enabled():
        return _fused_hdr_chunk(chunk, buf, models, writer, shrink, scale, tensor_changed)
    task: TensorTask = chunk.task
    n = chunk.size
    tau = _tau(chunk, buf, models)
    if shrink is not None:
        torch.hardshrink(tau, shrink, out=buf.b[:n])
        tau = buf.b[:n]
    if tensor_changed is None:
        low, high = torch.aminmax(tau)  # cheaper than tau.any(), and exact
        changed = int(bool(low < 0) or bool(high > 0))
    else:
        changed = int(tensor_changed)
    tau.mul_(scale)
    buf.stage.read_f32(models.files, models.target, task.target, chunk.start, chunk.stop, buf.c)
    result = buf.c[:n]
    result.sub_(tau)
    if not _all_finite(result):
        raise _nonfinite_error(chunk, models, "theta_t - scale * tau")
    _write_f32(result, task, chunk.start, buf, writer)
    return changed


def _fused_hdr_chunk(
    chunk: Chunk, buf: WorkerBuffers, models: Models, writer: ShardWriter, shrink: float | None, scale: float,
    tensor_changed: bool | None,
) -> int:
    """:func:`_hdr_chunk` in one C loop: the inputs are read as they are stored (bfloat16 stays
    raw), the result is rounded straight into the output buffer (bfloat16 or float32; float16
    output goes through torch's conversion, which also checks for overflow)."""
    task: TensorTask = chunk.task
    n = chunk.size
    h, h_bf16 = buf.stage.read_native(models.files, models.harmful, task.harmful, chunk.start, chunk.stop, buf.a)
    b, b_bf16 = buf.stage.read_native(models.files, models.base, task.base, chunk.start, chunk.stop, buf.b)
    t, t_bf16 = buf.stage.read_native(models.files, models.target, task.target, chunk.start, chunk.stop, buf.c)
    out_bf16 = task.out_dtype == "BF16"
    finite, changed = fused.apply(h, int(h_bf16), b, int(b_bf16), t, int(t_bf16), n, shrink, scale,
                                  buf.out.view, int(out_bf16))
    if not finite:
        raise _nonfinite_error(chunk, models, "theta_t - scale * tau")
    if task.out_dtype == "F16":
        _write_f32(buf.out.raw_as("F32", n), task, chunk.start, buf, writer, into=buf.stage)
    else:
        size = itemsize(task.out_dtype)
        writer.write(task.name, chunk.start * size, buf.out.view[: n * size])
    return int(changed if tensor_changed is None else tensor_changed)


def _all_finite(values: torch.Tensor) -> bool:
    """True when no NaN/Inf: a float32 sum is NaN/Inf if any term is (and weights never sum past
    3e38), and costs a fraction of ``isfinite().all()``; a non-finite sum is double-checked."""
    total = float(values.sum(dtype=torch.float32))
    if math.isfinite(total):
        return True
    return bool(torch.isfinite(values).all())


def _copy_chunk(chunk: Chunk, buf: WorkerBuffers, models: Models, writer: ShardWriter) -> None:
    """Target values unchanged (converted only when --dtype asks for another float type)."""
    task: TensorTask = chunk.task
    info = task.target
    if task.out_dtype == info.dtype:
        raw = buf.stage.read_raw(models.files, models.target, info, chunk.start, chunk.stop)
        if info.dtype in FLOAT_CODES:
            values = buf.stage.raw_as(info.dtype, chunk.size)
            if not _all_finite(values):
                raise _nonfinite_error(chunk, models)
        writer.write(task.name, chunk.start * itemsize(info.dtype), raw)
        return
    result = buf.c[: chunk.size]
    buf.stage.read_f32(models.files, models.target, info, chunk.start, chunk.stop, buf.c)
    if not _all_finite(result):
        raise _nonfinite_error(chunk, models)
    _write_f32(result, task, chunk.start, buf, writer)


def _write_f32(result: torch.Tensor, task: TensorTask, start: int, buf: WorkerBuffers, writer: ShardWriter,
               into: Staging | None = None) -> None:
    """Round once to the output dtype (in ``into``, by default ``buf.out``) and write at the
    tensor's offset."""
    size = itemsize(task.out_dtype)
    if task.out_dtype == "F32":
        writer.write(task.name, start * size, byte_view(result))
        return
    out = (into or buf.out).raw_as(task.out_dtype, result.numel())
    out.copy_(result)
    if task.out_dtype == "F16" and not bool(torch.isfinite(out).all()):
        raise TensorValueError(
            f"tensor {task.name!r}: the result does not fit {task.out_dtype} (overflow to Inf); try --dtype float32"
        )
    writer.write(task.name, start * size, byte_view(out))

