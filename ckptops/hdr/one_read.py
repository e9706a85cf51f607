"""Global (and layer) top-k at the cost of one read: select and apply in the same pass.

The exact threshold t of a scope group needs every |tau| of the group, so the plain engine
reads base and harmful twice: once to select t, once to apply it. Here one pass does both:

1. A sample (1/64 of the values: the start of every chunk) estimates where t
   lies, at a resolution of 2**-12 of its value (the top 20 bits of |tau|), and a band of bit
   patterns ``[lo, hi)`` around the estimate that t falls into unless the sample misled.
2. The pass writes every output value against the estimate ``w`` (selected when |tau| >= w),
   counts exactly how many |tau| lie below the band, above it and at each pattern inside it,
   and records every in-band value (tensor, element, tau, target value) in a
   :class:`Corrections` store, per output shard: in memory up to its budget, and in the run's
   journal (:mod:`ckptops.hdr.journal`) once the shard is finished, so that ``--resume`` can
   skip the shard and still correct it.
3. The counts pin the exact t. Only values whose |tau| lies between w and t were written with
   the wrong decision; they are recomputed from their records, with the same float32
   arithmetic and rounding as the pass, and written over the finished shards.
4. Where t falls outside a group's band (a sample that misled; the band counts show it), that
   group falls back to today's passes: an exact two-pass selection over its tensors, then its
   tensors are written again. The report says so.

Groups too small to sample (fewer than ``engine.MIN_CHUNKS_FOR_BAND`` chunks) are selected
before the pass, exactly, at the cost of reading their own few values twice (not under
``--low-disk``, where that would hold their shards on disk: there they are sampled too).

Under ``--low-disk`` the pass walks the plan in units and releases each input shard after its
last use, so every shard is downloaded once; the sample reads shards not yet downloaded by HTTP
range requests.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ckptops.checkpoint.checksum import Checksum
from ckptops.checkpoint.dtypes import bfloat16_bits, itemsize, widen_into
from ckptops.checkpoint.writer import OutShard, ShardWriter
from ckptops.errors import TensorValueError
from ckptops.hdr import engine, select
from ckptops.hdr.chunks import Chunk, WorkerBuffers, WorkerPool
from ckptops.hdr.drift import DriftSums, group_key
from ckptops.hdr.engine import Models, Selection
from ckptops.hdr.journal import Journal
from ckptops.hdr.nonfinite import nonfinite_error
from ckptops.hdr.pause import pause_point
from ckptops.hdr.plan import Plan, TensorTask
from ckptops.hdr.shard_log import ShardLog, shard_index

#: resolution of the sampled estimate: the top FINE_BITS bits of |tau| (2**20 bins, 8 MiB)
FINE_SHIFT = 11
FINE_BINS = 1 << (31 - FINE_SHIFT)
#: the band covers the estimated rank +- this many standard errors of a random sample's
#: quantile, and at least MIN_MARGIN of the sample (the sample is systematic, not random)
MARGIN_SIGMAS = 8.0
MIN_MARGIN = 2e-4

def correction_budget(max_memory: int) -> int:
    """Bytes of correction records kept in memory before they spill to the staging folder: a
    quarter of what ``--max-memory`` leaves beside the interpreter (the work buffers take at
    most another quarter)."""
    from ckptops.hdr.options import BASELINE_RSS

    return max(1 << 20, (max_memory - BASELINE_RSS) // 4)


RECORD = np.dtype([("task", "<u4"), ("element", "<u8"), ("tau", "<f4"), ("target", "<f4"), ("base", "<f4")])


@dataclass
class Band:
    """A group's band ``[lo, lo + size)`` of |tau| bit patterns and the pattern ``write`` the
    pass selects from (|tau| >= write is written as selected). The pass counts in-band values
    per ``2**shift`` patterns (the records hold the exact patterns)."""

    lo: int
    size: int
    write: int
    shift: int = FINE_SHIFT

    @property
    def counters(self) -> int:
        """Histogram length: below, the in-band counters, above."""
        return ((self.size - 1) >> self.shift) + 3

    @property
    def shrink(self) -> float | None:
        """hardshrink's lambda for "|tau| >= write" (None: keep everything)."""
        return None if self.write == 0 else select.bits_to_float(min(self.write, 0x7F800000) - 1)


class Corrections:
    """The in-band values of the pass (see the module docstring), per output shard: in memory up
    to ``budget`` bytes, beyond that appended to the shard's records file in the journal (see
    :mod:`ckptops.hdr.journal`). A finished shard's records all go to its file
    (:meth:`close_shard`), so that ``--resume`` reads them instead of the shard's inputs, and
    stay in memory too while the budget allows (the end of the pass then reads no file); the
    shards a killed run finished (``finished``: shard -> count, bytes, checksum) are read from
    theirs. Thread-safe."""

    def __init__(self, journal: Journal, budget: int, shard_of_task: list[int],
                 finished: dict[int, dict | None]) -> None:
        self.journal = journal
        self.budget = budget
        self.shard_of = shard_of_task
        self.files = {shard: meta for shard, meta in finished.items() if meta}
        self.peak_memory = 0
        self._open: dict[int, tuple] = {}  # shard -> (checksum, records, bytes) of a file being written
        self._memory: dict[int, list[np.ndarray]] = {}  # records of shards not finished
        self._kept: dict[int, list[np.ndarray]] = {}  # finished shards' records, also in their files
        self._memory_bytes = 0
        self._lock = threading.Lock()

    def add(self, task_index: int, start: int, idx: np.ndarray, taus: np.ndarray, targets: np.ndarray,
            bases: np.ndarray) -> None:
        records = np.empty(len(idx), dtype=RECORD)
        records["task"] = task_index
        np.add(idx, start, out=records["element"], dtype=np.uint64, casting="unsafe")
        records["tau"] = taus
        records["target"] = targets
        records["base"] = bases
        with self._lock:
            self._memory.setdefault(self.shard_of[task_index], []).append(records)
            self._memory_bytes += records.nbytes
            self.peak_memory = max(self.peak_memory, self._memory_bytes)
            if self._memory_bytes > self.budget:
                self._memory_bytes -= sum(r.nbytes for pieces in self._kept.values() for r in pieces)
                self._kept.clear()  # they are in their files
                for shard in list(self._memory):
                    self._spill(shard)

    def _spill(self, shard: int, keep: bool = False) -> None:
        pieces = self._memory.pop(shard, [])
        if not pieces:
            return
        check, count, nbytes = self._open.get(shard) or (Checksum(), 0, 0)
        with open(self.journal.records_path(shard), "ab") as file:
            for records in pieces:
                data = records.view(np.uint8)
                file.write(data)
                check.update(data)
                count += len(records)
                nbytes += records.nbytes
        if keep:
            self._kept[shard] = pieces
        else:
            self._memory_bytes -= sum(r.nbytes for r in pieces)
        self._open[shard] = (check, count, nbytes)

    def close_shard(self, shard: int) -> dict | None:
        """Write the rest of a finished shard's records to its file; its count, bytes, checksum
        (None: it has none)."""
        with self._lock:
            self._spill(shard, keep=shard not in self._open)  # kept only if none went to the file before
            opened = self._open.pop(shard, None)
            if opened is None:
                return None
            check, count, nbytes = opened
            meta = self.files[shard] = {"count": count, "bytes": nbytes, "checksum": check.value()}
            return meta

    @property
    def count(self) -> int:
        """Records of the whole pass (also those of shards a killed run finished)."""
        return (sum(m["count"] for m in self.files.values()) + sum(o[1] for o in self._open.values())
                + sum(len(r) for pieces in self._memory.values() for r in pieces))

    @property
    def file_bytes(self) -> int:
        return sum(m["bytes"] for m in self.files.values()) + sum(o[2] for o in self._open.values())

    def batches(self, records_per_batch: int = 1 << 20):
        """Every record, in batches (records files read back in pieces of bounded size)."""
        for shard in sorted(self.files):
            if shard in self._kept:
                yield from self._kept[shard]
                continue
            with open(self.journal.records_path(shard), "rb") as file:
                while True:
                    data = file.read(records_per_batch * RECORD.itemsize)
                    if not data:
                        break
                    yield np.frombuffer(data, dtype=RECORD)
        for pieces in self._memory.values():
            yield from pieces


@dataclass
class OneReadResult:
    selections: dict[str, Selection]
    kept: dict[str, int]
    #: what the report says about the one-read pass
    summary: dict


def _read_sample(buf: WorkerBuffers, models: Models, checkpoint, info, start: int, stop: int, out: np.ndarray,
                 remote: bool) -> None:
    """Elements ``[start, stop)`` as float32 into ``out``: from the local file, or, when
    ``remote`` and the shard is not downloaded yet, by an HTTP range request (``--low-disk``:
    the sample must not download every shard before the pass)."""
    shard = checkpoint.shards.get(info.shard) if checkpoint.synthetic is None else None
    if not (remote and shard is not None and shard.path is None and hasattr(checkpoint, "read_range")):
        buf.stage.read_f32(models.files, checkpoint, info, start, stop, out)
        return
    size = itemsize(info.dtype)
    raw = checkpoint.read_range(info.shard, info.offset + start * size, (stop - start) * size)
    widen_into(raw, info.dtype, out[: stop - start])


def _fine_kernel(models: Models, remote: bool = False):
    """Add the top-20-bit keys of every |tau| to a FINE_BINS histogram (the sample)."""
    def kernel(chunk: Chunk, buf: WorkerBuffers, hist: np.ndarray) -> None:
        task: TensorTask = chunk.task
        n = chunk.size
        tau, base = buf.a_np[:n], buf.b_np[:n]
        _read_sample(buf, models, models.harmful, task.harmful, chunk.start, chunk.stop, buf.a_np, remote)
        _read_sample(buf, models, models.base, task.base, chunk.start, chunk.stop, buf.b_np, remote)
        np.subtract(tau, base, out=tau)
        bits = tau.view(np.uint32)
        np.bitwise_and(bits, 0x7FFFFFFF, out=bits)
        keys = buf.key_np[:n]
        np.right_shift(bits, FINE_SHIFT, out=keys)
        if int(keys.max(initial=0)) >= (0x7F800000 >> FINE_SHIFT):
            raise nonfinite_error(chunk, models)
        np.add.at(hist, keys, 1)  # a bincount of 2**20 bins per piece costs 50x more
    return kernel


#: how many sample pieces the prefetch may run ahead of the workers (with 1M-value chunks, 32 KiB
#: pieces: 32 MiB per input in flight), so that on a box with little memory the pages it asks
#: for are still cached when the workers read them
PREFETCH_AHEAD = 1024


@contextmanager
def _prefetching(sample: list[Chunk], models: Models, enabled: bool = True):
    """While the body runs, a thread asks the kernel for the sample pieces of harmful and base
    ahead of the workers (at most PREFETCH_AHEAD pieces ahead). The pieces are scattered over the
    whole model: read one by one from a cold cache, each waits for the disk (7B preset: 1.95 s for
    0.4 GB); asked for together, the disk serves many at once (1.6 s). Yields the function the
    workers call for each piece done."""
    done = threading.Semaphore(PREFETCH_AHEAD)
    if not enabled:
        yield lambda chunk: None
        return
    stop = threading.Event()

    def ahead() -> None:
        try:
            for c in sample:
                while not done.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                models.files.prefetch(models.harmful, c.task.harmful, c.start, c.stop)
                models.files.prefetch(models.base, c.task.base, c.start, c.stop)
        except OSError:  # only a hint: the workers' own reads report real errors
            return

    thread = threading.Thread(target=ahead, name="ckptops-prefetch", daemon=True)
    thread.start()
    try:
        yield lambda chunk: done.release()
    finally:
        stop.set()
        thread.join()


def estimate_band(tasks: list[TensorTask], count: int, rank: int, models: Models, pool: WorkerPool,
                  progress: Callable[[int], None] | None = None, remote: bool = False) -> Band:
    """The band a group's sample predicts. The sample is
    the first 1/64 of every chunk (not every 16th chunk, as the two-pass engine's estimate
    takes it): tensors of one group differ in scale, and a miss here costs a whole extra pass.
    (Every 4th chunk in 4x larger pieces halved the sample's time on a cold 7B preset, but
    biased it: a LoRA tau_H, whose small k/v tensors were sampled or not by position, missed.)
    ``remote`` (``--low-disk``): shards not downloaded yet are sampled by range requests, in
    pieces 64 times larger (one piece per 64 chunks) so that the requests stay few."""
    step = pool.chunk * (64 if remote else 1)
    piece = max(step // 64, 64)
    sample = [Chunk(c.task, c.start, min(c.start + piece, c.stop)) for c in engine._group_chunks(tasks, step)]
    counted = engine._selection_done(progress)
    with _prefetching(sample, models, enabled=not remote) as piece_done:
        def finished(chunk: Chunk) -> None:
            piece_done(chunk)
            if counted is not None:
                counted(chunk)

        hists = pool.run(sample, _fine_kernel(models, remote), lambda: np.zeros(FINE_BINS, dtype=np.int64), finished)
    hist = sum(hists)
    sampled = int(hist.sum())
    fraction = rank / count
    estimate = fraction * sampled
    margin = max(MARGIN_SIGMAS * math.sqrt(max(sampled * fraction * (1 - fraction), 1.0)), MIN_MARGIN * sampled, 2.0)
    cumulative = np.cumsum(hist)

    def fine_bin(r: float) -> int:
        r = min(max(int(round(r)), 1), sampled)
        return int(np.searchsorted(cumulative, r, side="left"))

    write_bin = fine_bin(estimate)
    lo_bin, hi_bin = fine_bin(estimate - margin), fine_bin(estimate + margin) + 1
    lo, hi, write = lo_bin << FINE_SHIFT, hi_bin << FINE_SHIFT, write_bin << FINE_SHIFT
    hi = min(hi, 0x7F800000)
    return Band(lo, max(hi - lo, 1), write)


def run_one_read(plan: Plan, models: Models, pool: WorkerPool, writer: ShardWriter, log: ShardLog, top_k: float,
                 scale: float, tick: Callable[[int], None] | None, correction_budget: int,
                 units: list[tuple[Plan, Callable[[], None]]] | None = None,
                 drift: DriftSums | None = None) -> OneReadResult:
    """Sample, then one pass over every tensor, then the corrections (see the module docstring).
    ``drift``, when given, gets the drift sums (:mod:`ckptops.hdr.drift`) of the exact selection.

    ``log`` tallies the pass per output shard and journals every finished shard; the shards a
    killed run finished (``--resume``) are not read again: their tallies and correction records
    come from the journal, and so do the bands (no sample is read again either).
    ``units`` (``--low-disk``): the part of the plan still to compute cut into consecutive
    pieces, each with a function to call once its pass is done (it releases the input files no
    later piece reads)."""
    groups: dict[str, list[TensorTask]] = {}
    for task in plan.hdr_tasks:
        groups.setdefault(task.group, []).append(task)
    clock = [time.perf_counter()]
    bands, selections = _bands(plan, groups, models, pool, top_k, tick, log.journal, remote=units is not None)
    clock.append(time.perf_counter())
    pause_point("selection")
    shrink = {g: engine.shrink_of(s) for g, s in selections.items()}
    task_index = {task.name: i for i, task in enumerate(plan.tasks)}
    corrections = log.records = Corrections(log.journal, correction_budget, [log.shard_of[t.name] for t in plan.tasks],
                                            {i: t.records for i, t in log.tallies.items()})
    path = models.kernels

    def work(chunk: Chunk, buf: WorkerBuffers, state: dict) -> None:
        if isinstance(chunk.task, tuple):
            task = chunk.task[1]
            engine._copy_chunk(Chunk(task, chunk.start, chunk.stop), buf, models, writer, path)
            read = chunk.size * itemsize(task.target.dtype)
        else:
            task = chunk.task
            tally = log.part(state, task.name)
            band = bands.get(task.group)
            sums = None
            if drift is not None:
                key = group_key(task.name)
                per_group = tally.sums(task.group)
                sums = per_group.chunk_slot(key, task.name, chunk.start)  # summed in a fixed order
                per_group.add_count(key, chunk.size)
            if band is None:
                tally.kept[task.name] = tally.kept.get(task.name, 0) + path.hdr_chunk(
                    chunk, buf, models, writer, shrink[task.group], scale, None, sums)
            else:
                hist = tally.hists.get(task.group)
                if hist is None:
                    hist = tally.hists[task.group] = np.zeros(band.counters, dtype=np.int64)
                index = task_index[task.name]
                peak = path.band_apply_chunk(
                    chunk, buf, models, writer, band.lo, band.size, band.shift, hist, band.shrink, scale,
                    lambda c, *values: corrections.add(index, c.start, *values), sums)
                tally.peaks[task.name] = max(peak, tally.peaks.get(task.name, -1))
            read = chunk.size * sum(itemsize(i.dtype) for i in (task.target, task.base, task.harmful))
        if tick:
            tick(read)
        log.chunk_done(task.name, chunk.size)

    for unit, done in units or [(log.remaining(plan), lambda: None)]:
        pool.run(engine.apply_chunks(unit, pool.chunk), work, log.new_state)
        done()
    writer.finish()
    clock.append(time.perf_counter())
    pause_point("correction")

    total = log.total()
    kept, peaks = dict(total.kept), total.peaks
    missed: list[str] = []
    located: dict[str, tuple[int, int, int]] = {}  # group -> (first pattern of its bin, rank in bin, kept above)
    for group, band in bands.items():
        hist = total.hists.get(group, np.zeros(band.counters, dtype=np.int64))
        count = plan.groups[group]
        rank = select.kth_rank(count, top_k)
        below, inside = int(hist[0]), hist[1:-1]
        if below < rank <= below + int(inside.sum()):
            position, in_bin = select.locate(inside, rank - below)
            above_bin = count - below - int(inside[: position + 1].sum())
            located[group] = (band.lo + (position << band.shift), in_bin, above_bin)
        else:
            missed.append(group)
    exact = exact_thresholds(plan, corrections, bands, located)
    for group, (threshold_bits, kept_values) in exact.items():
        selections[group] = Selection(select.bits_to_float(threshold_bits), plan.groups[group], kept_values)
        reach = max(threshold_bits, 1)
        for task in groups[group]:
            kept[task.name] = int(peaks.get(task.name, -1) >= reach)
    locations = writer.locations()
    group_drift = total.drift
    # from here the shards no longer hold what the pass wrote: a resumed run undoes the corrections
    # (towards these thresholds) before it checks them, or redoes everything after a fallback
    log.journal.update(phase="correcting", exact={g: bits for g, (bits, _) in exact.items()})
    patched = patch(plan, corrections, bands, selections, missed, scale, locations, group_drift)
    if missed:
        log.journal.update(phase="fallback")
    for group in missed:  # the sample misled: today's passes for this group, written over
        tasks = groups[group]
        sub = Plan(tasks, {group: plan.groups[group]})
        selections.update(engine.select_thresholds(sub, models, pool, top_k, tick))
        group_drift[group] = DriftSums()
        with PatchWriter(locations) as again:
            for name, value in engine.apply_all(sub, models, pool, again, selections, scale, tick,
                                                drift=group_drift[group] if drift is not None else None).items():
                kept[name] = value
    if drift is not None:
        for group in sorted(group_drift):
            drift.merge(group_drift[group])
    clock.append(time.perf_counter())
    summary = {
        "groups": len(bands),
        "selected_before": sorted(g for g in groups if g not in bands and top_k < 1),
        "band_missed": missed,
        "corrections_recorded": corrections.count,
        "values_corrected": patched,
        "correction_file_bytes": corrections.file_bytes,
        "correction_memory_peak": corrections.peak_memory,
        # where the time went: the sample (and small groups' selection), the pass (output written
        # and flushed), the exact thresholds, corrections and any fallback
        "seconds": {"sample": round(clock[1] - clock[0], 3), "pass": round(clock[2] - clock[1], 3),
                    "corrections": round(clock[3] - clock[2], 3)},
    }
    return OneReadResult(selections, kept, summary)


def _bands(plan: Plan, groups: dict[str, list[TensorTask]], models: Models, pool: WorkerPool, top_k: float,
           tick: Callable[[int], None] | None, journal: Journal,
           remote: bool) -> tuple[dict[str, Band], dict[str, Selection]]:
    """Per group, the band its sample predicts, or (groups too small to sample) its exact
    threshold selected before the pass. Journaled: a resumed run takes them from there, so that
    its pass writes against the same estimates and reads no sample."""
    if "bands" in journal.state:
        return ({g: Band(*v) for g, v in journal.state["bands"].items()},
                {g: Selection(*v) for g, v in journal.state["preselected"].items()})
    bands: dict[str, Band] = {}
    selections: dict[str, Selection] = {}
    for group, tasks in groups.items():
        count = plan.groups[group]
        if top_k >= 1.0:
            selections[group] = Selection(None, count, count)
        elif remote or sum(-(-t.numel // pool.chunk) for t in tasks) >= engine.MIN_CHUNKS_FOR_BAND:
            # (--low-disk: a selection before the pass would hold every shard on disk at once)
            bands[group] = estimate_band(tasks, count, select.kth_rank(count, top_k), models, pool, remote=remote)
        else:
            selections.update(engine.select_thresholds(Plan(tasks, {group: count}), models, pool, top_k, tick))
    journal.update(bands={g: [b.lo, b.size, b.write, b.shift] for g, b in bands.items()},
                   preselected={g: [s.threshold, s.count, s.kept] for g, s in selections.items()})
    return bands, selections


def undo_corrections(plan: Plan, journal: Journal, shards: list[OutShard], locations: dict[str, tuple[Path, int, int]],
                     scale: float, entries: dict[int, dict]) -> None:
    """``--resume`` after a kill during (or after) the corrections: write back, at every recorded
    position of the shards in ``entries`` whose decision the corrections changed, the value the
    pass wrote, so that those shards hash as the pass wrote them and can be checked. Idempotent;
    the resumed run writes the corrections again."""
    bands = {g: Band(*v) for g, v in journal.state["bands"].items()}
    exact = {g: Selection(select.bits_to_float(bits), 0, 0) for g, bits in journal.state.get("exact", {}).items()}
    present = {i: e["records"] for i, e in entries.items()
               if e.get("records") and (journal.folder / e["name"]).is_file()}
    shard_of = shard_index(shards)
    store = Corrections(journal, 0, [shard_of[t.name] for t in plan.tasks], present)
    patch(plan, store, bands, exact, [g for g in bands if g not in exact], scale, locations, undo=True)


def exact_thresholds(plan: Plan, corrections: Corrections, bands: dict[str, Band],
                     located: dict[str, tuple[int, int, int]]) -> dict[str, tuple[int, int]]:
    """Per group, the exact threshold's bit pattern and how many values it keeps: the counts
    located the threshold's bin of ``2**shift`` patterns and its rank inside; the records of
    that bin (every in-band value has one) give the exact pattern. They are counted per pattern
    (``2**shift`` counters a group), never gathered: on bfloat16 models ties put tens of millions
    of values in one bin (7B preset: 30 million, 0.7 GiB as a sorted array)."""
    n_tasks = len(plan.tasks)
    first = np.full(n_tasks, 0xFFFFFFFF, dtype=np.int64)
    stop = np.zeros(n_tasks, dtype=np.int64)
    group_of = np.full(n_tasks, -1, dtype=np.int64)
    names = list(located)
    counts = [np.zeros(1 << bands[group].shift, dtype=np.int64) for group in names]
    for i, task in enumerate(plan.tasks):
        if task.action == "hdr" and task.group in located:
            first[i] = located[task.group][0]
            stop[i] = first[i] + (1 << bands[task.group].shift)
            group_of[i] = names.index(task.group)
    for records in corrections.batches():
        bits = records["tau"].view(np.uint32) & np.uint32(0x7FFFFFFF)
        if len(names) == 1:  # one group (global scope): no per-record lookup
            lo = located[names[0]][0]
            mine = bits[(bits >= lo) & (bits < lo + len(counts[0]))]
            counts[0] += np.bincount((mine - np.uint32(lo)).astype(np.intp), minlength=len(counts[0]))
            continue
        bits = bits.astype(np.int64)
        task = records["task"].astype(np.int64)
        mine = (bits >= first[task]) & (bits < stop[task])
        if mine.any():
            offsets, owners = bits[mine] - first[task[mine]], group_of[task[mine]]
            for g in np.unique(owners):
                counts[int(g)] += np.bincount(offsets[owners == g], minlength=len(counts[int(g)]))
    result = {}
    for g, group in enumerate(names):
        lo, in_bin, above_bin = located[group]
        position = int(np.searchsorted(np.cumsum(counts[g]), in_bin))  # the in_bin-th smallest
        result[group] = (lo + position, above_bin + int(counts[g][position:].sum()))
    return result


def patch(plan: Plan, corrections: Corrections, bands: dict[str, Band], selections: dict[str, Selection],
          missed: list[str], scale: float, locations: dict[str, tuple[Path, int, int]],
          drift: dict[str, DriftSums] | None = None, undo: bool = False) -> int:
    """Write the correct value over every recorded value whose decision the estimate got
    wrong (|tau| between the band's ``write`` pattern and the exact threshold). Same float32
    arithmetic as the passes: s = (selected ? tau : +0) * float32(scale); r = t - s; rounded
    once (bfloat16/float16: nearest even). The drift sums of M tau (``mm``, ``dm``) of each
    rewritten value move from the written selection to the exact one. Returns how many values
    were rewritten. ``undo``: write the pass's values back over the corrected ones instead."""
    n_tasks = len(plan.tasks)
    exact = np.full(n_tasks, 0xFFFFFFFF, dtype=np.int64)
    written = np.full(n_tasks, 0xFFFFFFFF, dtype=np.int64)
    for i, task in enumerate(plan.tasks):
        band = bands.get(task.group) if task.action == "hdr" else None
        if band is None or task.group in missed:
            continue
        exact[i] = select.float_to_bits(selections[task.group].threshold)
        written[i] = band.write
    if undo:
        exact, written = written, exact
    if np.array_equal(exact, written):
        return 0  # the pass wrote against the exact thresholds: no decision to correct, no record to read
    factor = np.float32(scale)
    fds: dict[Path, int] = {}
    moved: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    pending: list[tuple[int, np.ndarray, np.ndarray]] = []
    total = 0
    try:
        for records in corrections.batches():
            bits = records["tau"].view(np.uint32) & np.uint32(0x7FFFFFFF)
            task = records["task"].astype(np.int64)
            wrong = (bits >= exact[task]) != (bits >= written[task])
            if not wrong.any():
                continue
            records, bits, task = records[wrong], bits[wrong], task[wrong]
            keep = bits >= exact[task]
            with np.errstate(over="ignore", invalid="ignore"):
                s = np.where(keep, records["tau"], np.float32(0.0)).astype(np.float32) * factor
                result = (records["target"] - s).astype(np.float32)
            for index in np.unique(task):
                mine = task == index
                info = plan.tasks[int(index)]
                values = result[mine]
                if not np.isfinite(values).all():
                    raise TensorValueError(f"tensor {info.name!r}: theta_t - scale * tau overflows float32")
                raw = _round(values, info)
                if drift and info.group in drift:
                    moved.append((int(index), records["element"][mine], records[mine], keep[mine]))
                file, start, _ = locations[info.name]
                fd = fds.get(file)
                if fd is None:
                    fd = fds[file] = os.open(file, os.O_WRONLY)
                size = itemsize(info.out_dtype)
                offsets = start + records["element"][mine].astype(np.int64) * size
                pending.append((fd, offsets, raw.view(np.uint8).reshape(-1, size)))
                total += int(mine.sum())
            if sum(len(offsets) for _, offsets, _ in pending) >= PATCH_BATCH:
                _write_values(pending, pause=not undo)
                pending.clear()
        _write_values(pending, pause=not undo)
        for fd in fds.values():
            os.fsync(fd)
        # drift: the moved values' terms, added in (tensor, element) order (records arrive in
        # worker order; float64 sums must not depend on it)
        for index in sorted({m[0] for m in moved}):
            parts = [m for m in moved if m[0] == index]
            elements = np.concatenate([m[1] for m in parts])
            order = np.argsort(elements, kind="stable")
            info = plan.tasks[index]
            _move_drift(drift[info.group].slot(group_key(info.name)), np.concatenate([m[2] for m in parts])[order],
                        np.concatenate([m[3] for m in parts])[order])
    finally:
        for fd in fds.values():
            os.close(fd)
    return total


#: threads writing corrected values: each small write into a page that is not in memory waits
#: for the disk to read that page first; several in flight keep the disk's queue full
PATCH_THREADS = 8
#: corrected values gathered (over record batches, which are small per shard) before writing
PATCH_BATCH = 1 << 18


def _write_values(pending: list[tuple[int, np.ndarray, np.ndarray]], pause: bool = False) -> None:
    """Write single values at their byte offsets.

    The shards were written with O_DIRECT, so their pages are not in the page cache and each
    small write first waits for the disk to read its page back (~65 us each when done one at a
    time: 2.4 s for 37k values on the 1.1B LoRA benchmark). The pages are asked for up front
    (POSIX_FADV_WILLNEED, asynchronous) and the writes go out from PATCH_THREADS threads, each
    over its own run of offsets in file order, so that the reads overlap. ``pause``: the
    ``patch`` pause point after each run's first value (a test's kill -9 with the corrections
    partly written)."""
    page = mmap.PAGESIZE
    advise = getattr(os, "posix_fadvise", None)
    jobs: list[tuple[int, int, bytes]] = []
    for fd, offsets, data in pending:
        if advise is not None:
            for first in np.unique(offsets // page):
                advise(fd, int(first) * page, page, os.POSIX_FADV_WILLNEED)
        jobs.extend((fd, int(offsets[k]), data[k].tobytes()) for k in np.argsort(offsets, kind="stable"))

    def write(part: list[tuple[int, int, bytes]]) -> None:
        for i, (fd, offset, value) in enumerate(part):
            os.pwrite(fd, value, offset)
            if pause and i == 0:
                pause_point("patch")

    if len(jobs) < 64 * PATCH_THREADS:
        write(jobs)
        return
    step = -(-len(jobs) // PATCH_THREADS)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(PATCH_THREADS, thread_name_prefix="ckptops-patch") as pool:
        for done in [pool.submit(write, jobs[i:i + step]) for i in range(0, len(jobs), step)]:
            done.result()


def _move_drift(sums: np.ndarray, records: np.ndarray, selected: np.ndarray) -> None:
    """Rewritten values change M tau: add the newly selected values' terms to ``mm`` and ``dm``
    and take the newly unselected ones' out (float64, d = theta_t - theta_b)."""
    tau = records["tau"].astype(np.float64)
    d = records["target"].astype(np.float64) - records["base"].astype(np.float64)
    sign = np.where(selected, 1.0, -1.0)
    sums[3] += float(np.sum(sign * tau * tau))
    sums[4] += float(np.sum(sign * d * tau))


def _round(values: np.ndarray, task: TensorTask) -> np.ndarray:
    """float32 values rounded once to the task's output dtype, as raw little-endian values."""
    if task.out_dtype == "F32":
        return values
    if task.out_dtype == "BF16":
        return bfloat16_bits(values)
    with np.errstate(over="ignore"):
        half = values.astype(np.float16)
    if not np.isfinite(half).all():
        raise TensorValueError(f"tensor {task.name!r}: the result does not fit F16 (overflow to Inf); try --dtype float32")
    return half


class PatchWriter:
    """``ShardWriter.write``'s interface over finished shards (the fallback rewrites a group's
    tensors in place)."""

    def __init__(self, locations: dict[str, tuple[Path, int, int]]) -> None:
        self._locations = locations
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def write(self, name: str, byte_offset: int, data) -> None:
        file, start, nbytes = self._locations[name]
        view = memoryview(data).cast("B")
        if byte_offset + len(view) > nbytes:
            raise AssertionError(f"write past the end of {name}")
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_WRONLY)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], start + byte_offset + done)
        pause_point("fallback")  # a test's kill -9 with the group half rewritten

    def __enter__(self) -> "PatchWriter":
        return self

    def __exit__(self, *exc) -> None:
        for fd in self._fds.values():
            if exc[0] is None:
                os.fsync(fd)
            os.close(fd)
        self._fds.clear()
