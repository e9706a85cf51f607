"""``--low-disk``: run the sanitize passes piece by piece and release every input shard
(``Checkpoint.release``: Hub inputs evict what they downloaded from the cache) as soon as no
remaining work in the current pass reads it, so that about one shard per model is on disk.

With ``tensor``/``layer`` scope each unit of consecutive tensors selects its own thresholds, so a
shard is needed only while its unit runs. With ``global`` scope the threshold needs every
base/harmful value before the first tensor can be written: each selection pass releases a shard
after its last use in that pass and the next pass downloads it again (three downloads of base and
harmful in all). The one-read pass (:mod:`ckptops.hdr.one_read`, the default for global and
layer scope) needs no selection pass: it walks :func:`release_units` and downloads every shard
once.
"""

from __future__ import annotations

from pathlib import Path

from ckptops.checkpoint.resolve import Checkpoint
from ckptops.checkpoint.writer import ShardWriter
from ckptops.hdr.chunks import WorkerPool
from ckptops.hdr.engine import Models, apply_all, count_low_pass, count_top_pass, finish_selection, select_thresholds
from ckptops.hdr.plan import Plan, TensorTask
from ckptops.hdr.select import TOP_BITS_SHIFT, kth_rank, locate


def _reads(task: TensorTask) -> list[tuple[str, str]]:
    """(role, shard) of every input file the apply pass reads for ``task``; selection reads the
    base/harmful part of the same list."""
    pairs = [("target", task.target.shard)]
    if task.action == "hdr":
        pairs += [("base", task.base.shard), ("harmful", task.harmful.shard)]
    return pairs


def _file_key(checkpoint: Checkpoint, shard: str) -> tuple:
    """One key per physical input file, so that a repo given twice (base == target) is released
    only when neither role needs it any more."""
    ident = checkpoint.identity
    if ident.get("type") == "hub":
        return ("hub", ident["repo"], ident["commit"], shard)
    path = checkpoint.shards[shard].path
    return ("file", str(Path(path).resolve()) if path is not None else f"{id(checkpoint)}:{shard}")


def _last_uses(tasks: list[TensorTask], roles: dict[str, Checkpoint], with_target: bool):
    """Per task, the input files it reads; per file, the index of the last task reading it and
    the (role, shard) pairs that name it."""
    keys = [{_file_key(roles[r], s): (r, s) for r, s in _reads(t) if with_target or r != "target"} for t in tasks]
    last_use: dict[tuple, int] = {}
    holders: dict[tuple, set[tuple[str, str]]] = {}
    for i, task_keys in enumerate(keys):
        for key, pair in task_keys.items():
            last_use[key] = i
            holders.setdefault(key, set()).add(pair)
    return keys, last_use, holders


def _finished(last_use: dict[tuple, int], holders: dict[tuple, set[tuple[str, str]]], start: int,
              stop: int) -> set[tuple[str, str]]:
    """The (role, shard) pairs whose last use falls in tasks ``start..stop``."""
    return {pair for key, j in last_use.items() if start <= j <= stop for pair in holders[key]}


def _release(models: Models, roles: dict[str, Checkpoint], pairs: set[tuple[str, str]]) -> None:
    for role, shard in sorted(pairs):
        models.files.close(roles[role], shard)
        if roles[role].release is not None:
            roles[role].release(shard)


def _select_global_low_disk(plan: Plan, models: Models, pool: WorkerPool, top_k: float, tick,
                            roles: dict[str, Checkpoint]) -> dict:
    """The global threshold without keeping every base/harmful shard on disk: each of the two
    selection passes walks the tasks in runs that end where some input file is read for the last
    time in that pass, and releases those files; the next pass (and the apply pass) fetches them
    again. Costs one download of base and harmful per pass (three in all) for a disk peak of
    about one shard per model. Exact: histograms of disjoint runs add up."""
    tasks = plan.hdr_tasks
    keys, last_use, holders = _last_uses(tasks, roles, with_target=False)
    runs, start = [], 0
    for i in range(len(tasks)):
        if i + 1 == len(tasks) or any(last_use[k] == i for k in keys[i]):
            runs.append((tasks[start:i + 1], _finished(last_use, holders, start, i)))
            start = i + 1
    count = plan.groups["all"]
    rank = kth_rank(count, top_k)
    hist_top = None
    for run, ending in runs:
        hist = count_top_pass(run, models, pool, tick)
        hist_top = hist if hist_top is None else hist_top + hist
        _release(models, roles, ending)
    top, rank_in_bin = locate(hist_top, rank)
    hist_low = None
    for run, ending in runs:
        hist = count_low_pass(run, models, pool, top << TOP_BITS_SHIFT, tick)
        hist_low = hist if hist_low is None else hist_low + hist
        _release(models, roles, ending)
    return {"all": finish_selection(hist_top, top, rank_in_bin, hist_low, count)}


def run_low_disk(plan: Plan, models: Models, pool: WorkerPool, writer: ShardWriter, top_k: float, scale: float,
                  scope: str, tick, drift=None, log=None, known: dict | None = None,
                  record=None) -> tuple[dict, dict[str, int]]:
    """Select and apply unit by unit (see the module docstring), releasing input shards early.

    A unit ends after a task that is the last reader of some input file, and never inside a
    selection group whose thresholds it computes. Returns (selections, changed chunks per tensor); ``drift`` (a
    :class:`ckptops.hdr.drift.DriftSums`), when given, gets the apply passes' drift sums. With
    ``log`` (see :func:`ckptops.hdr.engine.apply_all`) those go to the log instead.

    ``--resume``: ``record(selections)`` is called whenever new thresholds are known, before any
    value selected by them is written (the journal keeps them); a resumed run passes them back as
    ``known`` with ``plan`` the tasks still to compute, and selects only the groups not in it.
    Every group with a task in a finished shard was selected before that shard was written, so
    the groups left to select lie wholly in ``plan``."""
    roles = {"base": models.base, "harmful": models.harmful, "target": models.target}
    selections = dict(known or {})
    preselect = scope == "global" and top_k < 1
    if preselect and "all" not in selections:
        selections.update(_select_global_low_disk(plan, models, pool, top_k, tick, roles))
        if record is not None:
            record(selections)
    keys, last_use, holders = _last_uses(plan.tasks, roles, with_target=True)
    group_end = {} if preselect else {t.group: i for i, t in enumerate(plan.tasks) if t.group is not None}
    kept: dict[str, int] = {}
    start, open_until = 0, -1
    for i, task in enumerate(plan.tasks):
        open_until = max(open_until, group_end.get(task.group, -1))
        last = i + 1 == len(plan.tasks)
        if not last and (i < open_until or all(last_use[k] != i for k in keys[i])):
            continue
        unit = Plan(plan.tasks[start:i + 1], plan.groups)
        todo = [t for t in unit.tasks if t.action == "hdr" and t.group not in selections]
        if not preselect and todo:
            selections.update(select_thresholds(Plan(todo, plan.groups), models, pool, top_k, tick))
            if record is not None:
                record(selections)
        for name, value in apply_all(unit, models, pool, writer, selections, scale, tick, drift=drift,
                                     log=log).items():
            kept[name] = kept.get(name, 0) + value
        _release(models, roles, _finished(last_use, holders, start, i))
        start = i + 1
    return selections, kept


def release_units(plan: Plan, models: Models) -> list[tuple[Plan, object]]:
    """The plan cut into consecutive units, each ending after a task that is the last reader of
    some input file, with a function that releases those files (for the one-read pass under
    ``--low-disk``: every input shard is fetched once and evicted after its last use)."""
    roles = {"base": models.base, "harmful": models.harmful, "target": models.target}
    keys, last_use, holders = _last_uses(plan.tasks, roles, with_target=True)
    units, start = [], 0
    for i in range(len(plan.tasks)):
        if i + 1 == len(plan.tasks) or any(last_use[k] == i for k in keys[i]):
            ending = _finished(last_use, holders, start, i)
            units.append((Plan(plan.tasks[start:i + 1], plan.groups),
                          lambda ending=ending: _release(models, roles, ending)))
            start = i + 1
    return units
