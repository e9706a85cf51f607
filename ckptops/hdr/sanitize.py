"""``ckptops.sanitize``: Harm Direction Removal from three checkpoints to a new model folder.

resolve -> plan -> select thresholds (pass 1) -> apply and write (pass 2) -> publish [-> push].
Every check that needs no tensor data (options, paths, names, shapes; for Hub inputs, every
header, read by range requests) runs before any work starts, and the output is built in a
temporary folder that replaces ``out`` only when complete.

``low_disk`` (see :mod:`ckptops.hdr.low_disk`) runs the same passes piece by piece and releases
input shards as soon as no remaining work needs them.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ckptops import __version__
from ckptops.checkpoint.card import render_card
from ckptops.checkpoint.dtypes import CONFIG_DTYPE_NAMES, DTYPE_NAMES, itemsize
from ckptops.checkpoint.publish import check_destination, copy_side_files, staging_folder, write_index
from ckptops.checkpoint.lora import open_inputs
from ckptops.checkpoint.resolve import Checkpoint, fingerprint, full_sha256
from ckptops.checkpoint.writer import OutTensor, ShardWriter, layout_by_size, layout_like_target
from ckptops.errors import UsageError
from ckptops.hdr.chunks import WorkerBuffers, WorkerPool, single_threaded_torch
from ckptops.hdr.engine import Models, apply_all, select_thresholds
from ckptops.hdr.low_disk import run_low_disk
from ckptops.hdr.layers import format_layers, parse_layers
from ckptops.hdr.plan import SCOPES, make_plan
from ckptops.progress import ByteProgress
from ckptops.units import parse_size

#: resident memory before any buffer: ~250 MiB with torch imported (the torch path), less
#: without (the fused path); chunks use the rest
BASELINE_RSS = 320 << 20
DEFAULT_CHUNK = 1 << 20


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
        if self.pushed:
            lines.append(f"  pushed to {self.pushed['url']} (branch {self.pushed['branch']}, commit {self.pushed['commit'][:12]})")
        return "\n".join(lines)


def _check_numbers(top_k: float, scale: float) -> None:
    if not isinstance(top_k, (int, float)) or not math.isfinite(top_k) or not 0 < top_k <= 1:
        raise UsageError(f"--top-k must be a fraction in (0, 1] (0.10 keeps the largest 10%), got {top_k!r}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise UsageError(f"--scale must be a finite number, got {scale!r}")


def _output_dtype(dtype: str | None) -> str | None:
    if dtype is None or dtype == "auto":
        return None
    code = DTYPE_NAMES.get(str(dtype).lower())
    if code is None:
        raise UsageError(f"--dtype must be auto, bfloat16, float16 or float32, not {dtype!r}")
    return code


def chunk_for_memory(max_memory: int, workers: int) -> int:
    """Elements per chunk so that all workers' buffers fit beside the interpreter in max_memory."""
    room = max_memory - BASELINE_RSS
    if room < 16 << 20:
        raise UsageError(
            f"--max-memory {max_memory >> 20} MiB is too small: ckptops needs about {(BASELINE_RSS >> 20) + 16} MiB at least"
        )
    chunk = room // (4 * workers * WorkerBuffers.bytes_per_element())
    return int(max(1 << 12, min(DEFAULT_CHUNK, chunk)))


def _identity(checkpoint: Checkpoint, full_hash: bool) -> dict:
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
    top_k: float = 0.10,
    scale: float = 3.0,
    scope: str = "global",
    exclude: list[str] | tuple[str, ...] = (),
    layers: str | frozenset[int] | None = None,
    dtype: str | None = None,
    max_memory: str | int = "1GiB",
    shard_size: str | int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    hash_inputs: bool = False,
    workers: int | None = None,
    chunk_elements: int | None = None,
    title: str | None = None,
    low_disk: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    branch: str | None = None,
    commit_message: str | None = None,
    edit_area: str | None = None,
    force: bool = False,
) -> SanitizeReport:
    """Subtract the top-k pruned harm vector from ``target`` and write the result to ``out``.

    ``theta = theta_target - scale * (|tau| >= t) * tau`` with ``tau = theta_harmful - theta_base``
    in float32 and ``t`` the exact top-``top_k`` magnitude threshold over ``scope`` (``global``:
    every scalar of the model, as the official code; ``layer``; ``tensor``). Tensors matching an
    ``exclude`` regex, or outside ``layers`` when given, are copied unchanged. Returns a
    :class:`SanitizeReport`; raises :class:`ckptops.errors.CkptopsError` on bad input, leaving
    ``out`` untouched.

    Inputs may be Hub references (``org/name[@revision]``): each revision is pinned to a commit
    and every header read before any download; shards then download through the Hugging Face
    cache in the order the passes need them. ``low_disk`` releases input shards as soon as no
    remaining work reads them (see the module docstring for what each scope keeps).
    ``push_to_hub`` uploads the finished folder to that repo (``private``, ``branch``,
    ``commit_message``); if the push fails, ``out`` is complete and the error says how to retry.

    ``edit_area="auto"`` (edited models) compares target and base, and restricts selection and
    update to layers l-1, l, l+1 around every layer l where they differ. A target whose model card
    says it was already sanitized is refused unless ``force``.

    Example::

        report = ckptops.sanitize("llama2-chat/", "llama2-harmful/", "wizardmath/", "wm-safe/",
                                  top_k=0.10, scale=3.0)
        print(report.format_text())
    """
    started = time.perf_counter()
    _check_numbers(top_k, scale)
    if scope not in SCOPES:
        raise UsageError(f"--scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    out_code = _output_dtype(dtype)
    layer_set = parse_layers(layers) if not isinstance(layers, frozenset) else layers
    memory = parse_size(max_memory, "--max-memory")
    shard_bytes = parse_size(shard_size, "--shard-size") if shard_size is not None else None
    workers = workers or min(2, os.cpu_count() or 1)
    chunk = chunk_elements or chunk_for_memory(memory, workers)
    if edit_area is not None and edit_area != "auto":
        raise UsageError(f"--edit-area must be 'auto', not {edit_area!r}")
    if edit_area is not None and layer_set is not None:
        raise UsageError("give --layers or --edit-area auto, not both")
    if push_to_hub is None and (private or branch or commit_message):
        raise UsageError("--private, --branch and --commit-message only apply with --push-to-hub")
    if push_to_hub is not None:
        from ckptops.hub.push import check_push_target

        check_push_target(push_to_hub)

    # harmful may be a LoRA adapter and target BASE+ADAPTER (see checkpoint/lora.py)
    opened = open_inputs(base, harmful, target)
    models = Models(opened.tau_base, opened.harmful, opened.target)
    if not force:
        refuse_if_sanitized(models.target)
    for checkpoint in (models.base, models.harmful, models.target):
        checkpoint.progress = progress
    roots = [m.root for m in (models.base, models.harmful, models.target) if m.root is not None]
    out_path = check_destination(Path(out), roots, overwrite)
    area_report = None
    if edit_area is not None:
        from ckptops.hdr.diff import diff_checkpoints

        area_report = diff_checkpoints(opened.base, models.target, workers=workers)
        if not area_report.edit_area:
            raise UsageError(
                f"--edit-area auto: {models.target.ref} does not differ from {models.base.ref} in any decoder layer"
            )
        layer_set = frozenset(area_report.edit_area)
    plan = make_plan(models.base, models.harmful, models.target, scope=scope, exclude=list(exclude),
                     layers=layer_set, out_dtype=out_code)

    out_tensors = [(OutTensor(t.name, t.out_dtype, t.target.shape), t.target.shard) for t in plan.tasks]
    shards = (layout_by_size([t for t, _ in out_tensors], shard_bytes) if shard_bytes
              else layout_like_target(out_tensors))
    parameters = {
        "method": "harm-direction-removal",
        "top_k": top_k,
        "scale": scale,
        "scope": scope,
        "exclude": list(exclude),
        "layers": format_layers(layer_set) if layer_set is not None else "all",
        "edit_area": "auto" if area_report is not None else "",
        "dtype": dtype or "auto",
        "ckptops_version": __version__,
    }
    inputs = {role: _identity(ckpt, hash_inputs) for role, ckpt in
              (("base", models.base), ("harmful", models.harmful), ("target", models.target))}

    # selection reads base and harmful once (plus a 1/64 sample); global scope under --low-disk,
    # and the rare fallback, read them twice
    passes = 2 if (low_disk and scope == "global") else 1
    select_bytes = passes * sum(t.numel * (itemsize(t.base.dtype) + itemsize(t.harmful.dtype))
                                for t in plan.hdr_tasks) if top_k < 1 else 0
    with staging_folder(out_path, overwrite) as folder, single_threaded_torch():
        pool = WorkerPool(workers, chunk)
        writer = ShardWriter(folder, shards, {"format": "pt", "producer": f"ckptops {__version__}"})
        bytes_read = 0
        bar = None

        def tick(n: int) -> None:
            nonlocal bytes_read
            bytes_read += n
            bar.update(n)

        apply_total = sum(t.target.nbytes + (t.base.nbytes + t.harmful.nbytes if t.action == "hdr" else 0)
                          for t in plan.tasks)
        try:
            if low_disk:
                with ByteProgress(select_bytes + apply_total, "select + apply (low disk)", progress) as bar:
                    selections, kept = run_low_disk(plan, models, pool, writer, top_k, scale, scope, tick)
            else:
                with ByteProgress(select_bytes, "select threshold", progress) as bar:
                    selections = select_thresholds(plan, models, pool, top_k, tick)
                with ByteProgress(apply_total, "apply + write", progress) as bar:
                    kept = apply_all(plan, models, pool, writer, selections, scale, tick)
            writer.finish()
        finally:
            writer.abort()  # no-op after finish(); else wakes workers waiting on the writer
            pool.close()
            writer.close()
            models.files.close()
        copied: dict[str, list[str]] = {}
        for task in plan.tasks:
            if task.action == "copy":
                copied.setdefault(task.reason, []).append(task.name)
        selected = sum(plan.groups.values())
        kept_total = sum(sel.kept for sel in selections.values())
        report = SanitizeReport(
            out=str(out_path),
            tensors_total=len(plan.tasks),
            tensors_changed=sum(1 for v in kept.values() if v),
            values_selected_over=selected,
            values_selected=kept_total,
            fraction_kept=kept_total / selected if selected else 0.0,
            thresholds={g: s.threshold for g, s in selections.items()},
            bytes_read=bytes_read,
            bytes_written=writer.total_bytes(),
            seconds=0.0,
            copied=copied,
            resized=plan.resized,
            parameters=parameters,
            inputs=inputs,
            engine=models.kernels.PATH_NAME,
        )
        write_index(folder, writer.weight_map(), writer.total_bytes())
        config_dtype = CONFIG_DTYPE_NAMES.get(out_code) if out_code else None
        copy_side_files(models.target.side_files(), folder, config_dtype)
        report.seconds = time.perf_counter() - started
        provenance = {"tool": f"ckptops {__version__}", "title": title or f"{Path(out_path).name}",
                      "parameters": parameters, "inputs": inputs, "report": _summary(report)}
        (folder / "ckptops.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        (folder / "README.md").write_text(render_card(provenance, hub_repo=push_to_hub), encoding="utf-8")
    report.seconds = time.perf_counter() - started
    if push_to_hub is not None:
        from ckptops.hub.push import push

        report.pushed = push(out_path, push_to_hub, private=private, branch=branch,
                             commit_message=commit_message).to_dict()
    return report


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
    }
