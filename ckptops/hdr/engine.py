"""The two streaming jobs of HDR: find each scope's exact threshold, then write
theta_t - scale * (|tau| >= t) * tau for every tensor, chunk by chunk.

Each chunk runs on one of two paths that give the same bits: :mod:`kernels_fused` (the C loops of
:mod:`fused` and numpy; torch is never imported) when the extension is built, else
:mod:`kernels_torch` (preallocated buffers and in-place/``out=`` torch ops). This module holds
what both share and imports neither. Arithmetic is float32 throughout; the result is rounded once
(round-to-nearest-even) to the output dtype. Unselected entries subtract exactly +0, so the
target's bits are kept there.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

import numpy as np

from ckptops.checkpoint.dtypes import itemsize
from ckptops.checkpoint.reader import OpenFiles
from ckptops.checkpoint.resolve import Checkpoint
from ckptops.checkpoint.writer import ShardWriter
from ckptops.hdr import fused, select
from ckptops.hdr.drift import DriftSums, group_key
from ckptops.hdr.chunks import Chunk, WorkerBuffers, WorkerPool, split
from ckptops.hdr.nonfinite import nonfinite_error, raw_all_finite
from ckptops.hdr.plan import Plan, TensorTask
from ckptops.hdr.shard_log import ShardLog, ShardTally


def kernels():
    """The per-chunk kernels of the path that runs: :mod:`kernels_fused` when the extension is
    built and enabled, else :mod:`kernels_torch` (imported only then: it imports torch)."""
    name = "kernels_fused" if fused.enabled() else "kernels_torch"
    return importlib.import_module(f"ckptops.hdr.{name}")


@dataclass
class Models:
    """The three inputs, the open file handles shared by all workers, and the kernels module of
    the path this run takes (decided once, when the run starts)."""

    base: Checkpoint
    harmful: Checkpoint
    target: Checkpoint
    files: OpenFiles = field(default_factory=OpenFiles)
    kernels: ModuleType = field(default_factory=kernels)


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
    return select_thresholds_many(plan, models, pool, [top_k], progress)[top_k]


def select_thresholds_many(
    plan: Plan,
    models: Models,
    pool: WorkerPool,
    top_ks: list[float],
    progress: Callable[[int], None] | None = None,
) -> dict[float, dict[str, Selection]]:
    """:func:`select_thresholds` for several top-k at once: the sample and the band pass of each
    group are shared by every top-k (one read of base and harmful serves them all), as ``tune``
    needs when its grid has several top-k values."""
    by_group: dict[str, list[TensorTask]] = {}
    for task in plan.hdr_tasks:
        by_group.setdefault(task.group, []).append(task)
    result: dict[float, dict[str, Selection]] = {k: {} for k in top_ks}
    for group, tasks in by_group.items():
        count = plan.groups[group]
        ranks = {k: select.kth_rank(count, k) for k in top_ks if k < 1.0}
        found = _select_group(tasks, count, sorted(set(ranks.values())), models, pool, progress) if ranks else {}
        for k in top_ks:
            result[k][group] = found[ranks[k]] if k in ranks else Selection(None, count, count)
    return result


#: a pass-1 band of at least this many top-16-bit bins (about +-1.5% in value) around the
#: sampled estimate, widened to BAND_SIGMAS standard errors of the sample, at most MAX_BAND_BINS
#: (each bin is 2**15 exact counters, 256 KiB per worker; wide bands happen on small groups only)
BAND_BINS = 4
BAND_SIGMAS = 6.0
MAX_BAND_BINS = 64
#: groups smaller than this many chunks skip the sampling step (two plain passes are cheap)
MIN_CHUNKS_FOR_BAND = 8


def _select_group(tasks: list[TensorTask], count: int, ranks: list[int], models: Models, pool: WorkerPool,
                  progress: Callable[[int], None] | None) -> dict[int, Selection]:
    """Radix-select the ``rank``-th smallest |tau| of one group, exactly, for every rank given.

    Fast path (one pass): a sample (1/64 of the values) estimates where each threshold
    lies; one pass then counts, exactly, how many |tau| fall below a narrow band of bit patterns
    around each estimate, above it, and at every single bit pattern inside it. If a rank lands
    inside its band, that pins its threshold. Otherwise (a poor sample; never seen in practice)
    the general two-pass radix select runs for the ranks left: top 16 bits of every value, then
    the low 15 bits of the values in each threshold's top bin.
    """
    found: dict[int, Selection] = {}
    if sum(-(-t.numel // pool.chunk) for t in tasks) >= MIN_CHUNKS_FOR_BAND:
        hist_sample = sample_histogram(tasks, models, pool)
        band_of = {rank: band_around(hist_sample, count, rank) for rank in ranks}
        bands = sorted(set(band_of.values()))
        states = pool.run(_group_chunks(tasks, pool.chunk), models.kernels.band_kernel(models, bands),
                          lambda: [BandTally(np.zeros(size + 2, dtype=np.int64)) for _, size in bands],
                          _selection_done(progress))
        for rank in ranks:
            i = bands.index(band_of[rank])
            selection = _band_selection([state[i] for state in states], bands[i], count, rank)
            if selection is not None:
                found[rank] = selection
    left = [rank for rank in ranks if rank not in found]
    if left:
        hist_top = count_top_pass(tasks, models, pool, progress)
        for rank in left:
            top, rank_in_bin = select.locate(hist_top, rank)
            hist_low = count_low_pass(tasks, models, pool, top << select.TOP_BITS_SHIFT, progress)
            found[rank] = finish_selection(hist_top, top, rank_in_bin, hist_low, count)
    return found


def _band_selection(tallies: list[BandTally], band: tuple[int, int], count: int, rank: int) -> Selection | None:
    """The exact selection when ``rank`` falls inside the counted band, else None."""
    lo, size = band
    hist = sum(tally.hist for tally in tallies)
    below, inside = int(hist[0]), hist[1: size + 1]
    if not below < rank <= below + int(inside.sum()):
        return None
    position, _ = select.locate(inside, rank - below)
    threshold = select.bits_to_float(lo + position)
    # a tensor changes when some |tau| >= t (> 0: a zero tau changes nothing)
    reach = max(lo + position, 1)
    changed = frozenset(name for tally in tallies for name, peak in tally.peaks.items() if peak >= reach)
    return Selection(threshold, count, count - below - int(inside[:position].sum()), changed)


def finish_selection(hist_top: np.ndarray, top: int, rank_in_bin: int, hist_low: np.ndarray,
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


#: the selection sample reads this many pieces spread over every chunk, 1/SAMPLE_FRACTION of it
SAMPLE_PIECES = 8
SAMPLE_FRACTION = 64


def sample_chunks(tasks: list[TensorTask], chunk: int):
    """The selection sample: from every chunk, SAMPLE_PIECES short pieces at spread, varying
    offsets (1/SAMPLE_FRACTION of its values in all).

    Why spread: weights are not exchangeable along a tensor (rows of an embedding, heads of a
    projection differ), so a sample of whole chunk prefixes is biased. On SmolLM2-135M a sample
    of the first quarter of every 16th chunk put the top-10% threshold 2.5% off, outside the
    band; pieces from every chunk put it 0.1% off."""
    for i, c in enumerate(_group_chunks(tasks, chunk)):
        span = max(1, c.size // SAMPLE_PIECES)
        n = max(1, c.size // (SAMPLE_FRACTION * SAMPLE_PIECES))
        for j in range(min(SAMPLE_PIECES, c.size)):
            start = c.start + j * span + (i * 7919 + j * 104729) % max(1, span - n + 1)
            yield Chunk(c.task, start, min(start + n, c.stop))


def estimate_band(tasks: list[TensorTask], count: int, rank: int, models: Models,
                  pool: WorkerPool) -> tuple[int, int]:
    """(first bit pattern, width) of the band around the threshold that a sample
    (:func:`sample_chunks`, 1/64 of the values) predicts (see :func:`band_around`)."""
    return band_around(sample_histogram(tasks, models, pool), count, rank)


def sample_histogram(tasks: list[TensorTask], models: Models, pool: WorkerPool) -> np.ndarray:
    """The top-16-bit histogram of |tau| over the selection sample (:func:`sample_chunks`)."""
    hists = pool.run(sample_chunks(tasks, pool.chunk), _top_kernel(models),
                     lambda: np.zeros(select.TOP_BINS, dtype=np.int64))
    return sum(hists) if hists else np.zeros(select.TOP_BINS, dtype=np.int64)


def band_around(hist_sample: np.ndarray, count: int, rank: int) -> tuple[int, int]:
    """The band around the ``rank``-th of ``count`` values, as the sample histogram places it:
    (first bit pattern, width). It spans the sampled rank +- BAND_SIGMAS standard errors of a
    sample quantile (and at least BAND_BINS top bins around the estimate), at most MAX_BAND_BINS.

    Why the margin: a fixed +-2 bins missed on bfloat16 inputs, whose |tau| piles up on few
    patterns (on a 1.3M-parameter test model the top-10% threshold fell exactly on a bin edge and
    the top-3% rank 4 values below the band), and every miss costs two more passes."""
    sampled = int(hist_sample.sum())
    if sampled == 0:
        return 0, BAND_BINS << select.TOP_BITS_SHIFT
    fraction = rank / count
    position = fraction * sampled
    margin = max(BAND_SIGMAS * math.sqrt(max(sampled * fraction * (1 - fraction), 1.0)), 2.0)
    cumulative = np.cumsum(hist_sample)

    def bin_at(r: float) -> int:
        return int(np.searchsorted(cumulative, min(max(int(round(r)), 1), sampled), side="left"))

    estimate = bin_at(position)
    first = min(bin_at(position - margin), estimate - BAND_BINS // 2 + 1)
    last = max(bin_at(position + margin), estimate + BAND_BINS // 2)
    first = max(first, estimate - MAX_BAND_BINS // 2 + 1, 0)
    last = min(last, first + MAX_BAND_BINS - 1, select.TOP_BINS - 1)
    return first << select.TOP_BITS_SHIFT, (last - first + 1) << select.TOP_BITS_SHIFT


def count_top_pass(tasks: list[TensorTask], models: Models, pool: WorkerPool,
                   progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Pass 1 over ``tasks``: the top-16-bit histogram of |tau|. Histograms of disjoint task
    lists add up, so a caller may run it piece by piece."""
    states = pool.run(_group_chunks(tasks, pool.chunk), _top_kernel(models),
                      lambda: np.zeros(select.TOP_BINS, dtype=np.int64), _selection_done(progress))
    return sum(states) if states else np.zeros(select.TOP_BINS, dtype=np.int64)


def count_low_pass(tasks: list[TensorTask], models: Models, pool: WorkerPool, top_bits: int,
                   progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Pass 2 over ``tasks``: exact counts of the low 15 bits of the values in bin ``top_bits``."""
    states = pool.run(_group_chunks(tasks, pool.chunk), _count_low_kernel(models, top_bits),
                      lambda: np.zeros(select.LOW_BINS + 2, dtype=np.int64), _selection_done(progress))
    return sum(states)[1: select.LOW_BINS + 1].copy() if states else np.zeros(select.LOW_BINS, dtype=np.int64)


def _top_kernel(models: Models):
    """Add the top-16-bit keys of every |tau| to a ``select.TOP_BINS`` numpy histogram. Both paths
    use this numpy kernel: it serves the 1/64 selection sample and the rare two-pass fallback."""
    def kernel(chunk: Chunk, buf: WorkerBuffers, hist: np.ndarray) -> None:
        task: TensorTask = chunk.task
        n = chunk.size
        tau, base = buf.a_np[:n], buf.b_np[:n]
        buf.stage.read_f32(models.files, models.harmful, task.harmful, chunk.start, chunk.stop, buf.a_np)
        buf.stage.read_f32(models.files, models.base, task.base, chunk.start, chunk.stop, buf.b_np)
        np.subtract(tau, base, out=tau)
        bits = tau.view(np.uint32)
        np.bitwise_and(bits, 0x7FFFFFFF, out=bits)
        keys = buf.key_np[:n]
        np.right_shift(bits, select.TOP_BITS_SHIFT, out=keys)
        counts = np.bincount(keys, minlength=select.TOP_BINS)
        if counts[select.NONFINITE_KEY:].any():
            raise nonfinite_error(chunk, models)
        hist += counts
    return kernel


def _count_low_kernel(models: Models, top_bits: int):
    """The low-bit pass kernel of the running path (a seam the tests watch)."""
    return models.kernels.low_kernel(models, top_bits)


def apply_all(
    plan: Plan,
    models: Models,
    pool: WorkerPool,
    writer: ShardWriter,
    selections: dict[str, Selection],
    scale: float,
    progress: Callable[[int], None] | None = None,
    drift: DriftSums | None = None,
    log: ShardLog | None = None,
) -> dict[str, int]:
    """Write every output tensor; returns, per HDR tensor, how many of its chunks changed.
    ``drift``, when given, gets the five drift sums of every HDR chunk added per layer group
    (:mod:`ckptops.hdr.drift`), computed in the same loop as the update. With ``log`` (a
    :class:`ckptops.hdr.shard_log.ShardLog`) both go to the log, per output shard, instead, and
    {} is returned: ``log.results(drift)`` gives them once every shard is finished."""

    def work(chunk: Chunk, buf: WorkerBuffers, state) -> None:
        if isinstance(chunk.task, tuple):
            task = chunk.task[1]
            _copy_chunk(Chunk(task, chunk.start, chunk.stop), buf, models, writer, path)
            read = chunk.size * itemsize(task.target.dtype)
        else:
            task = chunk.task
            tally = log.part(state, task.name) if log is not None else state
            changed = selections[task.group].changed
            sums = None
            if drift is not None:
                key = group_key(task.name)
                per_group = tally.sums(task.group)
                sums = per_group.chunk_slot(key, task.name, chunk.start)
                per_group.add_count(key, chunk.size)
            tally.kept[task.name] = tally.kept.get(task.name, 0) + path.hdr_chunk(
                chunk, buf, models, writer, shrink[task.group], scale,
                None if changed is None else task.name in changed, sums,
            )
            read = chunk.size * sum(itemsize(i.dtype) for i in (task.target, task.base, task.harmful))
        if progress:
            progress(read)
        if log is not None:
            log.chunk_done(task.name, chunk.size)

    shrink = {group: shrink_of(s) for group, s in selections.items()}
    path = models.kernels
    states = pool.run(apply_chunks(plan, pool.chunk), work, log.new_state if log is not None else ShardTally)
    if log is not None:
        return {}
    total = ShardTally()
    for state in states:
        total.merge(state)
    if drift is not None:
        for group in sorted(total.drift):
            drift.merge(total.drift[group])
    return total.kept


def apply_chunks(plan: Plan, chunk: int):
    """The apply pass's work in output order: HDR chunks (the task itself) over each HDR
    tensor's processed elements, then copy chunks (``("tail", task)``) over the rest."""
    for task in plan.tasks:
        if task.action == "hdr":
            yield from split(task, 0, task.numel, chunk)
            yield from split(("tail", task), task.numel, task.target.numel, chunk)
        else:
            yield from split(("tail", task), 0, task.target.numel, chunk)


def shrink_of(selection: Selection) -> float | None:
    """hardshrink's lambda for a selection: it keeps x where |x| > lambda and writes +0.0
    elsewhere, in one pass; with lambda the float just below t, |x| > lambda is exactly
    |x| >= t (ties kept). None: keep everything."""
    t = selection.threshold
    return select.float_before(t) if t is not None and t > 0.0 else None


def _copy_chunk(chunk: Chunk, buf: WorkerBuffers, models: Models, writer: ShardWriter, path) -> None:
    """Target values unchanged: raw bytes, checked for NaN/Inf; converted by the running path
    only when --dtype asks for another float type."""
    task: TensorTask = chunk.task
    info = task.target
    if task.out_dtype != info.dtype:
        path.convert_chunk(chunk, buf, models, writer)
        return
    raw = buf.stage.read_raw(models.files, models.target, info, chunk.start, chunk.stop)
    if not raw_all_finite(np.frombuffer(raw, dtype=np.uint8), info.dtype):
        raise nonfinite_error(chunk, models)
    writer.write(task.name, chunk.start * itemsize(info.dtype), raw)
