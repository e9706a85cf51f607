"""``ckptops.diagnose``: will HDR help this target? The drift figures of :mod:`ckptops.hdr.drift`
for a (base, harmful, target) triple, streamed like ``sanitize`` and writing nothing.

Which values count: exactly those ``sanitize`` would change with the same options, i.e. every
floating-point tensor present in all three models, not matched by ``--exclude``, inside
``--layers`` when given, and for tensors whose vocabulary rows differ, the rows common to all
three. M is the selection ``sanitize`` would make (the same exact top-k threshold per scope group).

Passes, per selection group:

- ``top_k = 1`` (nothing pruned) or a threshold already known: one pass over base, harmful and
  target, through the engine path's own update loop (:func:`ckptops.hdr.engine` kernels, output
  thrown away), so the sums are the very ones ``sanitize`` records.
- ``top_k < 1`` on a group of at least ``MIN_CHUNKS_FOR_BAND`` chunks: the selection's sample
  (1/64 of base and harmful) predicts a narrow band of |tau| bit patterns around the threshold;
  then **one** pass over the three models counts the band histogram (which pins the exact
  threshold, as the selection pass of ``sanitize`` does) and adds up the sums, keeping the two
  M-dependent sums (``mm``, ``dm``) per bit pattern inside the band and in total above it.
  Once the threshold is known, the bins at or above it are added: exact, with no second pass.
  If the band misses the threshold (a poor sample; not seen in practice) the threshold is found
  by the two-pass radix select and the sums pass runs again.
- small groups (layer/tensor scope, the odd norm weight): the selection's two cheap passes,
  then the sums pass.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ckptops.checkpoint.dtypes import itemsize
from ckptops.checkpoint.lora import open_inputs
from ckptops.checkpoint.resolve import Checkpoint
from ckptops.errors import UsageError
from ckptops.hdr import select
from ckptops.hdr.chunks import Chunk, WorkerBuffers, WorkerPool, single_threaded_torch, split
from ckptops.hdr.drift import DriftReport, DriftSums, add_chunk_sums, group_key
from ckptops.hdr.engine import (
    MIN_CHUNKS_FOR_BAND, Models, Selection, _select_group, count_low_pass, count_top_pass, estimate_band,
    finish_selection,
)
from ckptops.hdr.layers import format_layers, parse_layers
from ckptops.hdr.nonfinite import nonfinite_error
from ckptops.hdr.plan import SCOPES, Plan, TensorTask, make_plan
from ckptops.progress import ByteProgress
from ckptops.units import parse_size

#: resident memory before any buffer (as sanitize's budget)
BASELINE_RSS = 320 << 20
DEFAULT_CHUNK = 1 << 20


@dataclass
class DiagnoseReport:
    """The drift figures, the thresholds they used, and what the run read."""

    inputs: dict
    parameters: dict
    drift: DriftReport
    thresholds: dict[str, float | None]
    values_selected: int
    values_counted: int
    bytes_read: int
    seconds: float
    passes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def format_text(self) -> str:
        lines = [f"diagnose {self.inputs['target']} (base {self.inputs['base']}, harmful {self.inputs['harmful']})",
                 f"  HDR setting: top-k {self.parameters['top_k']:g} ({self.parameters['scope']} scope), "
                 f"scale {self.parameters['scale']:g}; M keeps {self.values_selected:,} of {self.values_counted:,} values"]
        lines.append(self.drift.format_text())
        lines.append(f"  read {self.bytes_read / 1e9:.2f} GB in {self.seconds:.1f} s; nothing written")
        return "\n".join(lines)


class _NullWriter:
    """Takes the update's output and drops it (diagnose writes nothing)."""

    def write(self, name: str, offset: int, data) -> None:
        return None


@dataclass
class _BandTally:
    """One worker's result of the one-pass band diagnosis."""

    hist: np.ndarray
    size: int
    drift: DriftSums = field(default_factory=DriftSums)
    bins: dict[str, np.ndarray] = field(default_factory=dict)

    def bins_of(self, key: str) -> np.ndarray:
        found = self.bins.get(key)
        if found is None:
            found = self.bins[key] = np.zeros((2, self.size), dtype=np.float64)
        return found


def _read_three(chunk: Chunk, buf: WorkerBuffers, models: Models, real_base: Checkpoint | None):
    """tau (float32, in ``buf.a_np``), theta_b and theta_t (float32) of the chunk. With a LoRA
    adapter as theta_H, ``models.base`` is a zero view (tau is the adapter's delta itself) and
    ``real_base`` the base the drift is measured from."""
    task: TensorTask = chunk.task
    n = chunk.size
    tau, base, target = buf.a_np[:n], buf.b_np[:n], buf.c_np[:n]
    buf.stage.read_f32(models.files, models.harmful, task.harmful, chunk.start, chunk.stop, tau)
    buf.stage.read_f32(models.files, models.base, task.base, chunk.start, chunk.stop, base)
    if real_base is not None:
        np.subtract(tau, base, out=tau)
        buf.stage.read_f32(models.files, real_base, task.base, chunk.start, chunk.stop, base)
        base_for_tau = None
    else:
        base_for_tau = base
    buf.stage.read_f32(models.files, models.target, task.target, chunk.start, chunk.stop, target)
    if base_for_tau is not None:
        np.subtract(tau, base_for_tau, out=tau)
    for values, what in ((tau, "tau"), (target, "theta_t")):
        if not math.isfinite(float(np.add.reduce(values, dtype=np.float64))) and not np.isfinite(values).all():
            raise nonfinite_error(chunk, models, what)
    return tau, base, target


def _band_kernel(models: Models, lo: int, size: int, real_base: Checkpoint | None = None):
    """Band histogram of |tau| (as the selection pass) plus the drift sums: dd, tt, dt in full,
    mm and dm of the values above the band, and mm/dm per bit pattern inside the band."""
    hi = lo + size

    def kernel(chunk: Chunk, buf: WorkerBuffers, tally: _BandTally) -> None:
        n = chunk.size
        tau, base, target = _read_three(chunk, buf, models, real_base)
        key = group_key(chunk.task.name)
        sums = tally.drift.chunk_slot(key, chunk.task.name, chunk.start)
        tally.drift.add_count(key, n)
        masked = buf.key_np[:n].view(np.float32)
        bits = np.abs(tau, out=masked).view(np.int32)
        select.add_band_counts(bits, lo, size, tally.hist, buf.below, buf.inside)
        above, inside = buf.below[:n], buf.inside[:n]
        np.greater_equal(bits, hi, out=above)
        np.greater_equal(bits, lo, out=inside)
        np.logical_xor(inside, above, out=inside)
        where = np.flatnonzero(inside)
        if where.size:
            pattern = bits[where].astype(np.int64) - lo
            x = tau[where].astype(np.float64)
            d = target[where].astype(np.float64) - base[where]
            bins = tally.bins_of(key)
            np.add.at(bins[0], pattern, x * x)
            np.add.at(bins[1], pattern, d * x)
        np.multiply(tau, above, out=masked)
        add_chunk_sums(sums, target, base, tau, masked)
    return kernel


def _sums_pass(tasks: list[TensorTask], selection: Selection, models: Models, pool: WorkerPool, scale: float,
               drift: DriftSums, tick, real_base: Checkpoint | None = None) -> None:
    """The sums of ``tasks`` with the threshold known, through the engine path's update loop
    (with a LoRA theta_H, whose update loop never reads the base: numpy over the three reads)."""
    threshold = selection.threshold
    shrink = select.float_before(threshold) if threshold is not None and threshold > 0.0 else None
    writer = _NullWriter()
    path = models.kernels

    def work(chunk: Chunk, buf: WorkerBuffers, state: DriftSums) -> None:
        key = group_key(chunk.task.name)
        state.add_count(key, chunk.size)
        if real_base is None:
            path.hdr_chunk(chunk, buf, models, writer, shrink, scale, True,
                           state.chunk_slot(key, chunk.task.name, chunk.start))
            return
        n = chunk.size
        tau, base, target = _read_three(chunk, buf, models, real_base)
        masked = tau
        if shrink is not None:
            masked = buf.key_np[:n].view(np.float32)
            np.abs(tau, out=masked)
            np.greater(masked, shrink, out=buf.below[:n])
            np.multiply(tau, buf.below[:n], out=masked)
        add_chunk_sums(state.chunk_slot(key, chunk.task.name, chunk.start), target, base, tau, masked)

    chunks = (c for task in tasks for c in split(task, 0, task.numel, pool.chunk))
    for state in pool.run(chunks, work, DriftSums, tick):
        drift.merge(state)


def _three_bytes(chunk: Chunk) -> int:
    task = chunk.task
    return chunk.size * sum(itemsize(i.dtype) for i in (task.base, task.harmful, task.target))


def _diagnose_group(tasks: list[TensorTask], count: int, top_k: float, scale: float, models: Models,
                    pool: WorkerPool, drift: DriftSums, progress, passes: dict,
                    real_base: Checkpoint | None = None) -> Selection:
    """The exact selection of one scope group and its drift sums (see the module docstring)."""
    read_three = (lambda c: progress(_three_bytes(c))) if progress else None
    if top_k >= 1.0:
        selection = Selection(None, count, count)
        _sums_pass(tasks, selection, models, pool, scale, drift, read_three, real_base)
        passes["one pass"] = passes.get("one pass", 0) + 1
        return selection
    rank = select.kth_rank(count, top_k)
    if sum(-(-t.numel // pool.chunk) for t in tasks) >= MIN_CHUNKS_FOR_BAND:
        lo, size = estimate_band(tasks, count, rank, models, pool)
        chunks = (c for task in tasks for c in split(task, 0, task.numel, pool.chunk))
        tallies = pool.run(chunks, _band_kernel(models, lo, size, real_base),
                           lambda: _BandTally(np.zeros(size + 2, dtype=np.int64), size), read_three)
        hist = sum(t.hist for t in tallies)
        below, inside = int(hist[0]), hist[1: size + 1]
        if below < rank <= below + int(inside.sum()):
            position, _ = select.locate(inside, rank - below)
            for tally in tallies:
                for key, bins in tally.bins.items():
                    slot = tally.drift.slot(key)
                    slot[3] += float(bins[0, position:].sum())
                    slot[4] += float(bins[1, position:].sum())
                drift.merge(tally.drift)
            passes["one pass"] = passes.get("one pass", 0) + 1
            return Selection(select.bits_to_float(lo + position), count,
                             count - below - int(inside[:position].sum()))
        # the band missed: the exact two-pass select, then the sums with the threshold known
        hist_top = count_top_pass(tasks, models, pool, progress)
        top, rank_in_bin = select.locate(hist_top, rank)
        hist_low = count_low_pass(tasks, models, pool, top << select.TOP_BITS_SHIFT, progress)
        selection = finish_selection(hist_top, top, rank_in_bin, hist_low, count)
        passes["band missed: select, then sums"] = passes.get("band missed: select, then sums", 0) + 1
    else:
        selection = _select_group(tasks, count, [rank], models, pool, progress)[rank]
        passes["small group: select, then sums"] = passes.get("small group: select, then sums", 0) + 1
    _sums_pass(tasks, selection, models, pool, scale, drift, read_three, real_base)
    return selection


def _check(top_k, scale) -> None:
    if not isinstance(top_k, (int, float)) or not math.isfinite(top_k) or not 0 < top_k <= 1:
        raise UsageError(f"--top-k must be a fraction in (0, 1] (0.10 keeps the largest 10%), got {top_k!r}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise UsageError(f"--scale must be a finite number, got {scale!r}")


def _chunk_for(memory: int, workers: int, band_keys: int) -> int:
    """Elements per chunk so that buffers, the float64 slices and the band bins fit in ``memory``."""
    band = workers * band_keys * 2 * 8 * (4 << select.TOP_BITS_SHIFT)
    room = memory - BASELINE_RSS - band
    if room < 16 << 20:
        raise UsageError(f"--max-memory {memory >> 20} MiB is too small: diagnose needs about "
                         f"{(BASELINE_RSS + band + (16 << 20)) >> 20} MiB here")
    chunk = room // (4 * workers * WorkerBuffers.bytes_per_element())
    return int(max(1 << 12, min(DEFAULT_CHUNK, chunk)))


def diagnose(
    base,
    harmful,
    target,
    *,
    top_k: float = 0.10,
    scale: float = 3.0,
    scope: str = "global",
    exclude: list[str] | tuple[str, ...] = (),
    layers: str | frozenset[int] | None = None,
    max_memory: str | int = "1GiB",
    progress: bool | None = None,
    workers: int | None = None,
    chunk_elements: int | None = None,
) -> DiagnoseReport:
    """How the target moved from the base, against the harm vector, and what HDR at ``scale`` with
    ``top_k``/``scope`` would do to it: the figures of :mod:`ckptops.hdr.drift` for the whole model
    and per decoder layer, and a verdict in plain words. Reads the three models (local folders,
    files or Hub references, as :func:`ckptops.sanitize`), in bounded memory; writes nothing.

    Example::

        report = ckptops.diagnose("smollm2/", "smollm2-harmful/", "smollm2-sft/", scale=3)
        print(report.format_text())          # report.drift.verdict.warning: expect damage?
    """
    started = time.perf_counter()
    _check(top_k, scale)
    if scope not in SCOPES:
        raise UsageError(f"--scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    layer_set = parse_layers(layers) if not isinstance(layers, frozenset) else layers
    memory = parse_size(max_memory, "--max-memory")
    workers = workers or min(2, os.cpu_count() or 1)
    # harmful may be a LoRA adapter and target BASE+ADAPTER, as in sanitize (checkpoint/lora.py)
    opened = open_inputs(base, harmful, target)
    models = Models(opened.tau_base, opened.harmful, opened.target)
    real_base = None if opened.tau_base is opened.base else opened.base
    for checkpoint in (opened.base, models.base, models.harmful, models.target):
        checkpoint.progress = progress
    plan: Plan = make_plan(models.base, models.harmful, models.target, scope=scope, exclude=list(exclude),
                           layers=layer_set)
    tasks = plan.hdr_tasks
    if not tasks:
        raise UsageError("no tensor takes part in HDR (every tensor is excluded, not floating point or target-only)")
    band_keys = len({group_key(t.name) for t in tasks}) if scope == "global" else 1
    chunk = chunk_elements or _chunk_for(memory, workers, band_keys)
    by_group: dict[str, list[TensorTask]] = {}
    for task in tasks:
        by_group.setdefault(task.group, []).append(task)
    total = sum(t.numel * sum(itemsize(i.dtype) for i in (t.base, t.harmful, t.target)) for t in tasks)
    drift, selections, passes = DriftSums(), {}, {}
    bytes_read = 0
    try:
        with single_threaded_torch(), ByteProgress(total, "diagnose", progress) as bar:
            pool = WorkerPool(workers, chunk)

            def tick(n: int) -> None:
                nonlocal bytes_read
                bytes_read += n
                bar.update(n)

            try:
                for group, group_tasks in by_group.items():
                    selections[group] = _diagnose_group(group_tasks, plan.groups[group], top_k, scale, models, pool,
                                                        drift, tick, passes, real_base)
            finally:
                pool.close()
    finally:
        models.files.close()
    parameters = {"top_k": top_k, "scale": scale, "scope": scope, "exclude": list(exclude),
                  "layers": format_layers(layer_set) if layer_set is not None else "all"}
    return DiagnoseReport(
        inputs={"base": opened.base.ref, "harmful": models.harmful.ref, "target": models.target.ref},
        parameters=parameters,
        drift=DriftReport.from_sums(drift, scale, parameters),
        thresholds={g: s.threshold for g, s in selections.items()},
        values_selected=sum(s.kept for s in selections.values()),
        values_counted=sum(plan.groups.values()),
        bytes_read=bytes_read,
        seconds=time.perf_counter() - started,
        passes={k: str(v) for k, v in passes.items()},
    )
