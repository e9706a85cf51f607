"""``ckptops.sanitize``: Harm Direction Removal from three checkpoints to a new model folder.

The pipeline, one named function per step, in the order :func:`sanitize` calls them:
:func:`resolve` (open the inputs, headers only) -> :func:`plan_output` (align tensors, lay out
shards) -> :func:`select_pass` (the exact thresholds) -> :func:`apply_pass` (compute and write)
-> :func:`publish` (index, side files, ``ckptops.json``, card; moved into place) ->
:func:`push_output`. Options are one validated :class:`SanitizeOptions`.
Every check that needs no tensor data (options, paths, names, shapes; for Hub inputs, every
header, read by range requests) runs before any work starts, and the output is built in a
temporary folder that replaces ``out`` only when complete.

``low_disk`` (see :mod:`ckptops.hdr.low_disk`) runs the same passes piece by piece and releases
input shards as soon as no remaining work needs them.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ckptops import __version__
from ckptops.checkpoint.card import render_card
from ckptops.checkpoint.dtypes import CONFIG_DTYPE_NAMES, itemsize
from ckptops.checkpoint.leftovers import Leftovers, is_live, staging_folders, sweep
from ckptops.checkpoint.lora import Inputs, open_inputs
from ckptops.checkpoint.publish import check_destination, copy_side_files, staging_folder, write_index
from ckptops.checkpoint.resolve import Checkpoint, fingerprint, full_sha256
from ckptops.checkpoint.side_files import check_side_files
from ckptops.checkpoint.writer import OutShard, OutTensor, ShardWriter, layout_by_size, layout_like_target
from ckptops.errors import UsageError
from ckptops.hdr.checks import check_after_work, check_before_work
from ckptops.hdr.chunks import WorkerPool, single_threaded_torch
from ckptops.hdr.drift import DriftReport, DriftSums
from ckptops.hdr.engine import Models, Selection, apply_all, select_thresholds
from ckptops.hdr.low_disk import release_units, run_low_disk
from ckptops.hdr import journal, one_read, shard_log
from ckptops.hdr.pause import pause_point
from ckptops.hdr.options import BASELINE_RSS, DEFAULT_CHUNK, SanitizeOptions, chunk_for_memory  # noqa: F401
from ckptops.hdr.plan import Plan, make_plan
from ckptops.progress import ByteProgress

@dataclass
class SanitizeReport:
    """What a sanitize run did (printed by the CLI, ``--json`` prints ``to_dict()``)."""

    out: str
    tensors_total: int
    tensors_changed: int
    values_selected_over: int
    values_selected: int
    fraction_kept: float
    thresholds: dict[str, float | None]
    bytes_read: int
    bytes_written: int
    seconds: float
    copied: dict[str, list[str]] = field(default_factory=dict)
    resized: list[str] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    pushed: dict = field(default_factory=dict)
    #: which per-chunk code ran: "fused C loops" or "torch ops" (same bits; see hdr/fused.py)
    engine: str = ""
    #: how the target drifted from the base against tau, computed in the apply pass (see
    #: hdr/drift.py); None when --harmful is a LoRA adapter (the base is then never read)
    drift: DriftReport | None = None
    #: why ``drift`` is None
    drift_note: str = ""
    #: temporary folders of earlier runs into the same output: removed (dead runs) and live
    leftovers: dict = field(default_factory=dict)
    #: bytes read from each input's files and, for Hub inputs, downloaded (whole shards and ranges)
    io: dict = field(default_factory=dict)
    #: ``--resume``: the output shards reused from a killed run (their hashes checked)
    resumed: dict = field(default_factory=dict)
    #: the one-read pass (global/layer scope): corrections recorded and written, the correction
    #: file's size, groups whose sampled band missed (those fell back to two passes)
    one_read: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.drift, dict):  # rebuilt from to_dict() (the recipe command does)
            self.drift = DriftReport.from_dict(self.drift)

    def to_dict(self) -> dict:
        return asdict(self)

    def format_text(self) -> str:
        rate = self.bytes_read / self.seconds / 1e9 if self.seconds else 0.0
        lines = [
            f"wrote {self.out}",
            f"  tensors changed   {self.tensors_changed} of {self.tensors_total}",
            f"  values selected   {self.values_selected:,} of {self.values_selected_over:,} "
            f"({100 * self.fraction_kept:.4f}%: |tau| >= threshold, ties included)",
        ]
        shown = list(self.thresholds.items())
        for group, value in shown[:4]:
            lines.append(f"  threshold         {value!r} ({group})" if value is not None else f"  threshold         none, k=1 ({group})")
        if len(shown) > 4:
            lines.append(f"  thresholds        ... {len(shown)} scope groups in all (see --json)")
        for reason, names in self.copied.items():
            lines.append(f"  unchanged ({reason}): {len(names)} tensor(s)" + (f": {', '.join(names[:4])}" + (" ..." if len(names) > 4 else "")))
        if self.resized:
            lines.append(f"  vocabulary rows differ: {', '.join(self.resized)} (common rows processed, extra target rows copied)")
        for role, ident in self.inputs.items():
            if ident.get("type") == "hub":
                lines.append(f"  {role:<17} {ident['repo']}@{ident.get('revision')} = commit {ident.get('commit')}")
        lines.append(
            f"  read {self.bytes_read / 1e9:.2f} GB, wrote {self.bytes_written / 1e9:.2f} GB in {self.seconds:.1f} s "
            f"({rate:.2f} GB/s read; {self.engine or 'torch ops'})"
        )
        if self.io:
            lines.append("  read per input    " + ", ".join(
                f"{role} {v['read'] / 1e9:.3f} GB" + (f" ({v['downloaded'] / 1e9:.3f} GB downloaded)" if v.get("downloaded") is not None else "")
                for role, v in self.io.items()))
        if self.one_read:
            o = self.one_read
            line = (f"  one read          {o['values_corrected']:,} of {o['corrections_recorded']:,} in-band values corrected"
                    f" (correction file {o['correction_file_bytes'] / 1e6:.1f} MB)")
            if o.get("seconds"):
                t = o["seconds"]
                line += f"; sample {t['sample']:.1f} s, pass {t['pass']:.1f} s, corrections {t['corrections']:.1f} s"
            if o["band_missed"]:
                line += f"; sampled band missed for {', '.join(o['band_missed'][:3])}: re-selected with two passes and rewritten"
            lines.append(line)
        lines += drift_lines(self.drift, self.drift_note)
        if self.resumed:
            r = self.resumed
            line = (f"  resumed           reused {len(r['reused_shards'])} finished output shard(s) of a killed run "
                    f"(checksums checked; {r['input_bytes_skipped'] / 1e9:.2f} GB of input not read again)")
            if r["redone_shards"]:
                more = " ..." if len(r["redone_shards"]) > 3 else ""
                line += f"; computed again: {', '.join(r['redone_shards'][:3])}{more}"
            lines.append(line)
        for folder in self.leftovers.get("removed", []):
            lines.append(f"  removed leftover  {folder} (an interrupted earlier run)")
        for folder in self.leftovers.get("live", []):
            lines.append(f"  note: {folder} belongs to another ckptops run still writing into this output; left alone")
        if self.pushed:
            lines.append(f"  pushed to {self.pushed['url']} (branch {self.pushed['branch']}, commit {self.pushed['commit'][:12]})")
        return "\n".join(lines)


def drift_lines(drift: DriftReport | None, note: str = "") -> list[str]:
    """The whole-model drift figures and the verdict, as sanitize prints them."""
    if drift is None:
        return [f"  drift             not computed: {note or 'see ckptops diagnose'}"]
    o = drift.overall
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    return [
        f"  drift             cos(theta_t - theta_b, tau) {fmt(o.cos_tau)}, with M tau {fmt(o.cos_masked_tau)}, "
        f"projection {fmt(o.projection)}; at scale {drift.scale:g}: ||lambda M tau||/||d|| {fmt(o.step_ratio)}, "
        f"||d - lambda M tau||/||d|| {fmt(o.residual_ratio)}",
        ("warning: " if drift.verdict.warning else "  verdict: ") + drift.verdict.message,
    ]


def input_identity(checkpoint: Checkpoint, full_hash: bool = False) -> dict:
    """What identifies an input in the report, the card and the resume key: the checkpoint's own
    identity (path or Hub repo and commit) with a content hash of a local one (sampled, or every
    byte with ``full_hash``). ``tune`` keys its log on it too."""
    ident = dict(checkpoint.identity)
    ident["ref"] = checkpoint.ref
    if ident.get("type") == "local":
        if full_hash:
            ident["hash_kind"] = "sha256"
            ident["files_sha256"] = {n: full_sha256(checkpoint.shard_path(n)) for n in checkpoint.shards}
            ident["sha256"] = _combine(ident["files_sha256"])
        else:
            ident["hash_kind"] = "sampled sha256"
            ident["sha256"] = fingerprint(checkpoint)
    return ident


def _combine(hashes: dict[str, str]) -> str:
    import hashlib

    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(hashes.items())).encode()).hexdigest()


def sanitize(
    base: str | os.PathLike,
    harmful: str | os.PathLike,
    target: str | os.PathLike,
    out: str | os.PathLike,
    *,
    options: SanitizeOptions | None = None,
    **choices,
) -> SanitizeReport:
    """Subtract the top-k pruned harm vector from ``target`` and write the result to ``out``.

    ``theta = theta_target - scale * (|tau| >= t) * tau`` with ``tau = theta_harmful - theta_base``
    in float32 and ``t`` the exact top-``top_k`` magnitude threshold over ``scope`` (``global``:
    every scalar of the model, as the official code; ``layer``; ``tensor``). Tensors matching an
    ``exclude`` regex, or outside ``layers`` when given, are copied unchanged. Returns a
    :class:`SanitizeReport` (its ``drift``: the figures of :func:`ckptops.diagnose`, computed in
    the apply pass, with a verdict); raises :class:`ckptops.errors.CkptopsError` on bad input, leaving
    ``out`` untouched.

    The choices are the fields of :class:`SanitizeOptions`, given either as keywords
    (``top_k=0.1, scale=3.0, scope="global", exclude=(), layers=None, edit_area=None,
    dtype="auto", max_memory="1GiB", shard_size=None, workers=None, chunk_elements=None,
    low_disk=False, resume=False, hash_inputs=False, progress=None, overwrite=False, force=False, title=None,
    push_to_hub=None, private=False, branch=None, commit_message=None``) or as one ``options``
    object.

    Inputs may be Hub references (``org/name[@revision]``): each revision is pinned to a commit
    and every header read before any download; shards then download through the Hugging Face
    cache in the order the passes need them. ``low_disk`` releases input shards as soon as no
    remaining work reads them (see :mod:`ckptops.hdr.low_disk`).
    ``push_to_hub`` uploads the finished folder to that repo (``private``, ``branch``,
    ``commit_message``); if the push fails, ``out`` is complete and the error says how to retry.

    ``resume`` continues a killed run into the same ``out`` with the same choices from where it
    stopped (see :mod:`ckptops.hdr.journal`); every run journals its progress for that.

    ``edit_area="auto"`` (edited models) compares target and base, and restricts selection and
    update to layers l-1, l, l+1 around every layer l where they differ. A target whose model card
    says it was already sanitized is refused unless ``force``.

    Example::

        report = ckptops.sanitize("llama2-chat/", "llama2-harmful/", "wizardmath/", "wm-safe/",
                                  top_k=0.10, scale=3.0)
        print(report.format_text())
    """
    started = time.perf_counter()
    if options is not None and choices:
        raise TypeError("sanitize(): give options=SanitizeOptions(...) or keyword choices, not both")
    options = options if options is not None else SanitizeOptions(**choices)
    run = resolve(base, harmful, target, out, options)
    plan_output(run)
    check_before_work(run)  # harmful settings and silent no-ops, before any tensor data
    key = resume_key(run)
    reuse = journal.find(run.out_path, key) if options.resume else None
    if options.resume and reuse is None:
        _say_why_not_resumed(run.out_path)
    run.leftovers = sweep(run.out_path, keep=reuse)
    with staging_folder(run.out_path, options.overwrite, reuse) as folder, single_threaded_torch():
        run.journal = journal.Journal.start(folder, key)  # every run: --resume may continue it
        selections, kept, _ = select_and_apply(run, folder, resuming=reuse is not None)
        report = make_report(run, selections, kept)
        check_after_work(report)
        publish(run, folder, report, started)
    report.seconds = time.perf_counter() - started
    push_output(run, report)
    return report


@dataclass
class Run:
    """What the passes of one sanitize run share: the options, the opened inputs, where the
    output goes, the plan and output shard layout (filled by :func:`plan_output`), and the
    bytes read so far (counted by :meth:`tick`, which also moves the progress bar)."""

    options: SanitizeOptions
    models: Models
    inputs: Inputs
    out_path: Path
    #: the layer set of the run: ``--layers``, or the edit area ``--edit-area auto`` found
    layers: frozenset[int] | None
    plan: Plan | None = None
    shards: list[OutShard] = field(default_factory=list)
    bytes_read: int = 0
    bar: ByteProgress | None = None
    #: the drift sums the apply pass adds up (None when harmful is a LoRA adapter: the base is
    #: not read, so theta_t - theta_b is not at hand)
    drift: DriftSums | None = None
    leftovers: Leftovers = field(default_factory=Leftovers)
    #: what ``--resume`` reused (empty when nothing)
    resumed: dict = field(default_factory=dict)
    #: the journal in the staging folder (see :mod:`ckptops.hdr.journal`)
    journal: journal.Journal | None = None
    _identities: dict | None = None
    #: what the one-read pass reports (empty when the run used the passes)
    one_read: dict = field(default_factory=dict)

    def tick(self, n: int) -> None:
        self.bytes_read += n
        if self.bar is not None:
            self.bar.update(n)

    def parameters(self) -> dict:
        return self.options.to_parameters(self.layers)

    def identities(self) -> dict:
        if self._identities is None:  # (--hash-inputs reads every input file for it: once)
            self._identities = {role: input_identity(ckpt, self.options.hash_inputs) for role, ckpt in (
                ("base", self.models.base), ("harmful", self.models.harmful), ("target", self.models.target))}
        return self._identities


def resolve(base, harmful, target, out, options: SanitizeOptions) -> Run:
    """Open the three inputs (headers only; ``harmful`` may be a LoRA adapter and ``target``
    BASE+ADAPTER, see :mod:`ckptops.checkpoint.lora`), check the destination and, for
    ``edit_area="auto"``, find the edit area. Every check that needs no tensor data runs here."""
    if options.push_to_hub is not None:
        from ckptops.hub.push import check_push_target

        check_push_target(options.push_to_hub)
    opened = open_inputs(base, harmful, target)
    models = Models(opened.tau_base, opened.harmful, opened.target)
    if not options.force:
        refuse_if_sanitized(models.target)
    check_side_files(models.target)  # its config/tokenizer files are copied into the output
    for checkpoint in (models.base, models.harmful, models.target):
        checkpoint.progress = options.progress
    roots = [m.root for m in (models.base, models.harmful, models.target) if m.root is not None]
    out_path = check_destination(Path(out), roots, options.overwrite)
    layers = options.layers
    if options.edit_area is not None:
        from ckptops.hdr.diff import diff_checkpoints

        area = diff_checkpoints(opened.base, models.target, workers=options.worker_count)
        if not area.edit_area:
            raise UsageError(
                f"--edit-area auto: {models.target.ref} does not differ from {models.base.ref} in any decoder layer"
            )
        layers = frozenset(area.edit_area)
    run = Run(options, models, opened, out_path, layers)
    run.drift = DriftSums() if opened.tau_base is opened.base and not _drift_sums_off() else None
    return run


def _drift_sums_off() -> bool:
    """``CKPTOPS_NO_DRIFT_SUMS=1`` skips the drift sums: only ``bench/bench_sanitize.py
    --drift-cost`` sets it, to measure what they cost."""
    return os.environ.get("CKPTOPS_NO_DRIFT_SUMS", "") not in ("", "0")


def _drift_note(run: Run) -> str:
    if run.drift is not None:
        return ""
    if run.inputs.tau_base is not run.inputs.base:
        return "--harmful is a LoRA adapter and sanitize does not read the base then (run `ckptops diagnose`)"
    return "switched off by CKPTOPS_NO_DRIFT_SUMS"


def plan_output(run: Run) -> None:
    """Align the inputs tensor by tensor (:func:`ckptops.hdr.plan.make_plan`) and lay out the
    output shards: the target's sharding, or ``shard_size`` pieces."""
    options = run.options
    run.plan = make_plan(run.models.base, run.models.harmful, run.models.target, scope=options.scope,
                         exclude=list(options.exclude), layers=run.layers, out_dtype=options.out_code)
    out_tensors = [(OutTensor(t.name, t.out_dtype, t.target.shape), t.target.shard) for t in run.plan.tasks]
    run.shards = (layout_by_size([t for t, _ in out_tensors], options.shard_size) if options.shard_size
                  else layout_like_target(out_tensors))


def select_and_apply(run: Run, folder: Path, resuming: bool = False) -> tuple[dict[str, Selection], dict[str, int],
                                                                           ShardWriter]:
    """The streaming work: the one-read pass (:mod:`ckptops.hdr.one_read`) or :func:`passes`,
    writing the shards into ``folder`` and journaling each one finished (see
    :mod:`ckptops.hdr.shard_log`). ``resuming``: ``folder`` is a killed run's, whose finished
    shards are reused where they check out. Returns the selections, the changed-chunk counts
    per tensor and the (finished) writer."""
    options, plan, models = run.options, run.plan, run.models
    workers = options.worker_count
    one = uses_one_read(run)
    needs = ("bands",) if one else ("selections", "partial_selections")
    reused, redone = shard_log.check_finished(run.journal, run.shards, workers, needs,
                                              _undo(run, folder) if one else None) if resuming else ({}, [])
    pool = WorkerPool(workers, options.chunk)
    writer = ShardWriter(folder, run.shards, _METADATA, reused=frozenset(run.shards[i].name for i in reused),
                         hashed=True)
    try:
        log = shard_log.ShardLog(run.journal, run.shards, plan, writer, reused)
        remaining = log.remaining(plan)
        if resuming:
            run.resumed = {"reused_shards": sorted(run.shards[i].name for i in reused), "redone_shards": redone,
                           "input_bytes_skipped": apply_bytes(plan) - apply_bytes(remaining)}
        units = release_units(remaining, models) if options.low_disk else None
        if one:
            with ByteProgress(apply_bytes(remaining), "select + apply (one read)", options.progress) as run.bar:
                result = one_read.run_one_read(plan, models, pool, writer, log, options.top_k, options.scale,
                                               run.tick, one_read.correction_budget(options.max_memory),
                                               units=units, drift=run.drift)
            selections, kept, run.one_read = result.selections, result.kept, result.summary
        else:
            selections, kept = passes(run, pool, writer, log, remaining, units)
        writer.finish()
    finally:
        run.bar = None
        writer.abort()  # no-op after finish(); else wakes workers waiting on the writer
        pool.close()
        writer.close()
        models.files.close()
    return selections, kept, writer


_METADATA = {"format": "pt", "producer": f"ckptops {__version__}"}


def _undo(run: Run, folder: Path):
    """What ``--resume`` calls to write the one-read pass's values back over a killed run's
    corrections (see :func:`ckptops.hdr.one_read.undo_corrections`)."""
    def undo(entries: dict[int, dict]) -> None:
        every = frozenset(s.name for s in run.shards)  # nothing opened: the locations only
        locations = ShardWriter(folder, run.shards, _METADATA, reused=every).locations()
        one_read.undo_corrections(run.plan, run.journal, run.shards, locations, run.options.scale, entries)
    return undo


def uses_one_read(run: Run) -> bool:
    """Global and layer scope select and apply in one read (:mod:`ckptops.hdr.one_read`);
    ``tensor`` scope, ``top_k=1`` and ``one_read=False`` use the passes below."""
    options = run.options
    return options.one_read and options.scope in ("global", "layer") and options.top_k < 1


def passes(run: Run, pool: WorkerPool, writer: ShardWriter, log: shard_log.ShardLog, remaining: Plan,
           units: list | None) -> tuple[dict[str, Selection], dict[str, int]]:
    """The exact thresholds (:func:`select_pass`, journaled: a resumed run takes them from
    there), then :func:`apply_pass` over the shards not finished. ``low_disk`` without journaled
    thresholds runs both unit by unit (:mod:`ckptops.hdr.low_disk`) over the shards not finished,
    journaling each unit's thresholds before it writes (a resumed run selects only the rest)."""
    options, models = run.options, run.models
    recorded = run.journal.state.get("selections")
    if recorded is not None:
        selections = _decode_selections(recorded)
    elif options.low_disk:
        # thresholds journaled as they are found, so that a kill loses only the unfinished shards
        total = selection_bytes(run) + apply_bytes(remaining)
        with ByteProgress(total, "select + apply (low disk)", options.progress) as run.bar:
            selections, _ = run_low_disk(remaining, models, pool, writer, options.top_k, options.scale,
                                         options.scope, run.tick, drift=run.drift, log=log,
                                         known=_decode_selections(run.journal.state.get("partial_selections") or {}),
                                         record=lambda found: run.journal.update(
                                             partial_selections=_encode_selections(found)))
    else:
        selections = select_pass(run, pool)
    if recorded is None:
        run.journal.update(selections=_encode_selections(selections))
    if recorded is not None or not options.low_disk:
        apply_pass(run, pool, writer, selections, log, remaining, units)
    return selections, log.results(run.drift)


def _encode_selections(selections: dict[str, Selection]) -> dict:
    return {g: [s.threshold, s.count, s.kept, None if s.changed is None else sorted(s.changed)]
            for g, s in selections.items()}


def _decode_selections(recorded: dict) -> dict[str, Selection]:
    return {g: Selection(t, c, k, None if changed is None else frozenset(changed))
            for g, (t, c, k, changed) in recorded.items()}


def _say_why_not_resumed(out: Path) -> None:
    """``--resume`` with nothing to continue: one line saying so, and why when a dead run's folder
    is there (its inputs, files or settings differ: continuing it would mix two runs' shards)."""
    dead = [f for f in staging_folders(out) if ".ckptops-tmp-" in f.name and not is_live(f)]
    why = ("an interrupted run's folder is there, but its inputs, their files or the settings differ"
           if dead else "no interrupted run into it was found")
    warnings.warn(f"--resume: nothing to continue for {out} ({why}); starting over", stacklevel=3)


def select_pass(run: Run, pool: WorkerPool) -> dict[str, Selection]:
    """Pass 1: the exact threshold of every selection group (see :mod:`ckptops.hdr.engine`)."""
    with ByteProgress(selection_bytes(run), "select threshold", run.options.progress) as run.bar:
        return select_thresholds(run.plan, run.models, pool, run.options.top_k, run.tick)


def apply_pass(run: Run, pool: WorkerPool, writer: ShardWriter, selections: dict[str, Selection],
               log: shard_log.ShardLog, remaining: Plan, units: list | None) -> None:
    """Pass 2: theta_t - scale * (|tau| >= t) * tau for every tensor of ``remaining``, written to
    the shards and tallied in ``log`` (``units``: ``--low-disk``, releasing input files early)."""
    with ByteProgress(apply_bytes(remaining), "apply + write", run.options.progress) as run.bar:
        for unit, done in units or [(remaining, lambda: None)]:
            apply_all(unit, run.models, pool, writer, selections, run.options.scale, run.tick, drift=run.drift,
                      log=log)
            done()


def selection_bytes(run: Run) -> int:
    """Bytes the selection reads: base and harmful once (plus a 1/64 sample, not counted here);
    global scope under ``low_disk`` reads them twice (and so does the rare fallback)."""
    if run.options.top_k >= 1:
        return 0
    passes = 2 if (run.options.low_disk and run.options.scope == "global") else 1
    return passes * sum(t.numel * (itemsize(t.base.dtype) + itemsize(t.harmful.dtype)) for t in run.plan.hdr_tasks)


def apply_bytes(plan: Plan) -> int:
    """Bytes the apply pass reads: every target tensor, and base and harmful of HDR tensors."""
    return sum(t.target.nbytes + (t.base.nbytes + t.harmful.nbytes if t.action == "hdr" else 0) for t in plan.tasks)


def resume_key(run: Run) -> str:
    """What must match for ``--resume`` to continue a killed run: parameters, inputs, layout, and
    whether the pass is the one-read pass.

    The inputs are their identities plus, for local files, each shard file's size and
    modification time: the sampled fingerprint misses an edit between its windows, and finished
    shards computed from the old bytes must not be mixed with new ones. (Only here, not in the
    identities ``ckptops.json`` records, so that two runs on the same inputs write the same bytes.
    A Hub input is pinned by its commit; a cache file downloaded again only costs a restart.)"""
    layout = [[s.name, [[t.name, t.dtype, list(t.shape)] for t in s.tensors]] for s in run.shards]
    opened = {"base": run.models.base, "harmful": run.models.harmful, "target": run.models.target}
    inputs = {role: dict(identity, file_stats=_file_stats(opened[role])) for role, identity in run.identities().items()}
    return journal.run_key(run.parameters(), inputs, layout, "one read" if uses_one_read(run) else "passes")


def _file_stats(checkpoint: Checkpoint) -> dict | None:
    """Size and modification time (ns) of each shard file of a local input (None for a Hub
    input or an adapter, whose identity already pins the content: its commit, its full hash).
    ``BASE+ADAPTER`` targets read the local base's files."""
    identity = checkpoint.identity
    local = identity.get("type") == "local" or (identity.get("type") == "base+lora-adapter"
                                                and identity.get("base", {}).get("type") == "local")
    if not local:
        return None
    stats = {}
    for name in sorted(checkpoint.shards):
        try:
            found = os.stat(checkpoint.shard_path(name))
        except OSError:
            return None  # read as a missing input when the run opens it
        stats[name] = [found.st_size, found.st_mtime_ns]
    return stats


def make_report(run: Run, selections: dict[str, Selection], kept: dict[str, int]) -> SanitizeReport:
    """The run's :class:`SanitizeReport` (``seconds`` is set by the caller at the end)."""
    plan = run.plan
    copied: dict[str, list[str]] = {}
    for task in plan.tasks:
        if task.action == "copy":
            copied.setdefault(task.reason, []).append(task.name)
    selected = sum(plan.groups.values())
    kept_total = sum(sel.kept for sel in selections.values())
    return SanitizeReport(
        out=str(run.out_path),
        tensors_total=len(plan.tasks),
        # ``kept`` flags the tensors holding a selected non-zero tau (every pass checks tau != 0, so a
        # threshold of 0 or no threshold at all, top-k 1, is counted right); scale 0 changes nothing
        tensors_changed=sum(1 for v in kept.values() if v) if run.options.scale != 0 else 0,
        values_selected_over=selected,
        values_selected=kept_total,
        fraction_kept=kept_total / selected if selected else 0.0,
        thresholds={g: s.threshold for g, s in selections.items()},
        bytes_read=run.bytes_read,
        bytes_written=sum(s.nbytes for s in run.shards),
        seconds=0.0,
        copied=copied,
        resized=plan.resized,
        parameters=run.parameters(),
        inputs=run.identities(),
        engine=run.models.kernels.PATH_NAME,
        drift=DriftReport.from_sums(run.drift, run.options.scale) if run.drift is not None else None,
        drift_note=_drift_note(run),
        leftovers=run.leftovers.to_dict(),
        one_read=run.one_read,
        io=input_io(run.models),
        resumed=run.resumed,
    )


def input_io(models: Models) -> dict:
    """Per input: bytes read from its files, and bytes downloaded (Hub inputs; None otherwise)."""
    return {role: {"read": models.files.read_bytes.get(id(ckpt), 0),
                   "downloaded": getattr(ckpt, "downloaded_bytes", None)}
            for role, ckpt in (("base", models.base), ("harmful", models.harmful), ("target", models.target))}


def publish(run: Run, folder: Path, report: SanitizeReport, started: float) -> None:
    """Complete the staging folder: the index, the target's config/tokenizer files, the
    provenance record ``ckptops.json`` and the model card (the caller then moves it into place)."""
    write_index(folder, {t.name: s.name for s in run.shards for t in s.tensors}, sum(s.nbytes for s in run.shards))
    pause_point("publish")
    out_code = run.options.out_code
    config_dtype = CONFIG_DTYPE_NAMES.get(out_code) if out_code else None
    copy_side_files(run.models.target.side_files(), folder, config_dtype)
    report.seconds = time.perf_counter() - started
    provenance = {"tool": f"ckptops {__version__}", "title": run.options.title or f"{Path(run.out_path).name}",
                  "parameters": report.parameters, "inputs": report.inputs, "report": _summary(report)}
    (folder / "ckptops.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(render_card(provenance, hub_repo=run.options.push_to_hub), encoding="utf-8")
    journal.remove(folder)  # last: a run killed before this is still resumed


def push_output(run: Run, report: SanitizeReport) -> None:
    """With ``push_to_hub``: upload the finished folder and record where in the report."""
    options = run.options
    if options.push_to_hub is None:
        return
    from ckptops.hub.push import push

    report.pushed = push(run.out_path, options.push_to_hub, private=options.private, branch=options.branch,
                         commit_message=options.commit_message).to_dict()


def refuse_if_sanitized(target: Checkpoint) -> None:
    """A target whose card carries the safety-arithmetic tag (or a ckptops provenance file) was
    sanitized already; doing it twice subtracts the harm vector twice."""
    if target.root is None:  # a Hub target: its repo holds ckptops.json or carries the tag
        marked = bool(getattr(target, "marked_sanitized", False))
        card = None
    else:
        card = target.root / "README.md"
        marked = (target.root / "ckptops.json").exists()
    if not marked and card is not None and card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            front = text.split("---", 2)[1] if text.count("---") >= 2 else ""
            marked = "safety-arithmetic" in front
    if marked:
        raise UsageError(f"{target.ref}: already sanitized (its model card says so); use --force to sanitize it again")


def _summary(report: SanitizeReport) -> dict:
    return {
        "tensors_total": report.tensors_total,
        "tensors_changed": report.tensors_changed,
        "values_selected_over": report.values_selected_over,
        "values_selected": report.values_selected,
        "fraction_kept": report.fraction_kept,
        "thresholds": report.thresholds,
        "copied": {k: len(v) for k, v in report.copied.items()},
        "resized": report.resized,
        "drift": report.drift.summary() if report.drift is not None else None,
    }
