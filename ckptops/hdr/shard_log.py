"""The pass's progress, output shard by output shard, so that ``--resume`` continues a killed run
mid-pass instead of from the start.

Everything the end of a pass computes (the one-read pass's exact thresholds and corrections, the
changed-tensor counts, the drift figures) is a sum over chunks. Each worker therefore adds its
chunks into a :class:`ShardTally` of the chunk's output shard, and when the last chunk of a shard
is done (:meth:`ShardLog.chunk_done`) the workers' tallies of that shard are merged and journaled
with the shard's checksum (see :mod:`ckptops.hdr.journal`). The end of the pass adds up the
tallies of every shard, journaled by this run or read back from a killed one: a reused shard
counts exactly as if its inputs had been read again. Drift sums stay per chunk (summed in (tensor,
offset) order at the end), so ``ckptops.json`` is the same bytes either way.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ckptops.checkpoint.writer import OutShard, ShardWriter
from ckptops.hdr.drift import SUMS, DriftSums
from ckptops.hdr.journal import Journal, file_checks_out
from ckptops.hdr.pause import pause_point
from ckptops.hdr.plan import Plan
from ckptops.jsontypes import dict_of, fields, is_int, is_number, is_str, list_of, optional, row


@dataclass
class ShardTally:
    """What one output shard contributes to the end of the pass: per selection group, the
    one-read band histogram and the drift sums; per tensor, its peak |tau| bit pattern (band
    groups) and how many of its chunks changed (other groups); its correction records (count,
    bytes and checksum of its records file)."""

    hists: dict[str, np.ndarray] = field(default_factory=dict)
    peaks: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    drift: dict[str, DriftSums] = field(default_factory=dict)
    records: dict | None = None

    def sums(self, group: str) -> DriftSums:
        found = self.drift.get(group)
        if found is None:
            found = self.drift[group] = DriftSums()
        return found

    def merge(self, other: ShardTally) -> None:
        for group, hist in other.hists.items():
            mine = self.hists.get(group)
            self.hists[group] = hist.copy() if mine is None else mine + hist
        for name, peak in other.peaks.items():
            self.peaks[name] = max(peak, self.peaks.get(name, -1))
        for name, n in other.kept.items():
            self.kept[name] = self.kept.get(name, 0) + n
        for group, sums in other.drift.items():
            self.sums(group).merge(sums)
        if other.records:
            mine = self.records or {"count": 0, "bytes": 0}
            self.records = {"count": mine["count"] + other.records["count"],
                            "bytes": mine["bytes"] + other.records["bytes"]}

    def to_json(self) -> dict:
        return {
            "hists": {g: h.tolist() for g, h in self.hists.items()},
            "peaks": self.peaks, "kept": self.kept, "records": self.records,
            "drift": {g: {"parts": [[name, start, key, part.tolist()]
                                    for (name, start), (key, part) in s.parts.items()],
                          "sums": {k: v.tolist() for k, v in s.sums.items()}, "counts": s.counts}
                      for g, s in self.drift.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> ShardTally:
        tally = cls({g: np.asarray(h, dtype=np.int64) for g, h in data["hists"].items()}, dict(data["peaks"]),
                    dict(data["kept"]), records=data.get("records"))
        for group, saved in data["drift"].items():
            sums = tally.sums(group)
            for name, start, key, part in saved["parts"]:
                sums.parts[(name, int(start))] = (key, np.asarray(part, dtype=np.float64))
            for key, values in saved["sums"].items():
                sums.slot(key)[:] = values
            sums.counts = {k: int(n) for k, n in saved["counts"].items()}
        return tally


class ShardLog:
    """Which output shards the pass has finished (``reused``: those a killed run finished), the
    workers' tallies per shard, and the journal they go to (see the module docstring).

    Workers call :meth:`part` for the tally of a chunk's shard in their own state (made by
    :meth:`new_state`) and :meth:`chunk_done` once the chunk is written and counted."""

    def __init__(self, journal: Journal, shards: list[OutShard], plan: Plan, writer: ShardWriter,
                 reused: dict[int, ShardTally]) -> None:
        self.journal = journal
        self.shards = shards
        self.writer = writer
        self.shard_of = shard_index(shards)
        self.tallies: dict[int, ShardTally] = dict(reused)
        self.reused = frozenset(reused)
        self.left = [0] * len(shards)
        for task in plan.tasks:
            self.left[self.shard_of[task.name]] += task.target.numel
        #: the one-read pass's correction store: a finished shard's records go to its file
        self.records = None
        self._states: list[dict[int, ShardTally]] = []
        self._lock = threading.Lock()
        self._journal_empty_shards()

    def remaining(self, plan: Plan) -> Plan:
        """The part of ``plan`` whose output shards a killed run did not finish."""
        return Plan([t for t in plan.tasks if self.shard_of[t.name] not in self.reused], plan.groups,
                    plan.target_only, plan.resized)

    def new_state(self) -> dict[int, ShardTally]:
        state: dict[int, ShardTally] = {}
        with self._lock:
            self._states.append(state)
        return state

    def part(self, state: dict[int, ShardTally], name: str) -> ShardTally:
        """The worker's tally of the shard holding tensor ``name``."""
        index = self.shard_of[name]
        found = state.get(index)
        if found is None:
            found = state[index] = ShardTally()
        return found

    def _journal_empty_shards(self) -> None:
        """Journal the shards with nothing to compute (every tensor empty: the header is all)."""
        for index, left in enumerate(self.left):
            if left == 0 and index not in self.tallies:
                self._finish(index)

    def chunk_done(self, name: str, elements: int) -> None:
        index = self.shard_of[name]
        with self._lock:
            self.left[index] -= elements
            done = self.left[index] == 0
        if done:
            self._finish(index)

    def _finish(self, index: int) -> None:
        """Merge the workers' tallies of a finished shard (no worker touches them again) and
        journal them with the shard's checksum."""
        with self._lock:
            states = list(self._states)
        tally = ShardTally()
        for state in states:
            part = state.pop(index, None)
            if part is not None:
                tally.merge(part)
        if self.records is not None:
            tally.records = self.records.close_shard(index)
        shard = self.shards[index]
        entry = {"name": shard.name, "size": self.writer.file_size(shard.name),
                 "checksum": self.writer.checksum(shard.name), **tally.to_json()}
        self.journal.write_entry(index, entry)
        with self._lock:
            self.tallies[index] = tally
            finished = len(self.tallies) - len(self.reused)
        if finished == max(1, len(self.shards) // 2):
            pause_point("apply")

    def results(self, drift: DriftSums | None) -> dict[str, int]:
        """Once every shard is finished: the changed-chunk counts per tensor, and the drift sums
        added to ``drift``."""
        total = self.total()
        if drift is not None:
            for group in sorted(total.drift):
                drift.merge(total.drift[group])
        return total.kept

    def total(self) -> ShardTally:
        """Every shard's tally added up, in shard order."""
        if len(self.tallies) != len(self.shards):
            raise AssertionError(f"{len(self.shards) - len(self.tallies)} output shard(s) not finished")
        total = ShardTally()
        for index in sorted(self.tallies):
            total.merge(self.tallies[index])
        return total


_SUMS = list_of(is_number, len(SUMS))
#: a shard entry as :meth:`ShardLog._finish` writes it (see :meth:`ShardTally.to_json`)
_ENTRY = fields(
    name=is_str, size=lambda v: is_int(v) and v >= 0, checksum=is_str,
    hists=dict_of(list_of(is_int)), peaks=dict_of(is_int), kept=dict_of(is_int),
    records=optional(fields(count=is_int, bytes=is_int, checksum=is_str)),
    drift=dict_of(fields(parts=list_of(row(is_str, is_int, is_str, _SUMS)), sums=dict_of(_SUMS),
                         counts=dict_of(is_int))),
)


def shard_index(shards: list[OutShard]) -> dict[str, int]:
    """Tensor name -> index of the output shard holding it."""
    return {t.name: i for i, s in enumerate(shards) for t in s.tensors}


def check_finished(journal: Journal, shards: list[OutShard], workers: int, needs: tuple[str, ...],
                   undo=None) -> tuple[dict[int, ShardTally], list[str]]:
    """``--resume``: the shards a killed run finished whose files (and correction records) check
    out, as tallies by shard index, and the names of those that did not (they are computed again).

    Nothing is reused unless the journal holds one of ``needs`` (what the pass started from: the
    one-read ``bands``, the ``selections``, or the ``partial_selections`` that ``--low-disk``
    journals unit by unit). ``undo(entries)``, called first when the journal's phase is
    ``correcting`` or ``fallback``, writes back the values the pass
    wrote where the corrections may have changed them (the one-read pass: see
    :func:`ckptops.hdr.one_read.undo_corrections`), so that the shards hash as written."""
    if not any(need in journal.state for need in needs):
        journal.drop()
        if journal.phase != "pass":
            journal.update(phase="pass")
        return {}, []
    named = {i: e for i, e in journal.entries().items() if i < len(shards) and e.get("name") == shards[i].name}
    # (an entry with a value of another type is a damaged one: that shard is computed again)
    entries = {i: e for i, e in named.items() if _ENTRY(e) and _records_check_out(journal, i, e["records"])}
    if journal.phase in ("correcting", "fallback") and undo is not None:
        # (a kill during the band-miss fallback: the corrections are undone here; the shards whose
        # tensors the fallback had rewritten in place no longer check out and are computed again,
        # and the resumed run, missing the same band, runs the fallback again over the group)
        undo(entries)
        journal.update(phase="pass")

    def check(item):
        index, entry = item
        try:
            tally = ShardTally.from_json(entry)
        except (KeyError, TypeError, ValueError, AttributeError):  # not an entry this version wrote
            return index, None
        ok = file_checks_out(journal.folder / entry["name"], entry["size"], entry["checksum"], padded=True)
        return index, tally if ok else None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        good = {i: tally for i, tally in pool.map(check, sorted(entries.items())) if tally is not None}
    journal.drop(keep=set(good))
    redone = sorted(shards[i].name for i in set(named) - set(good))
    return good, redone


def _records_check_out(journal: Journal, index: int, records) -> bool:
    """A shard's correction records (none, or a file of the recorded size and checksum)."""
    if not records:
        return True
    return isinstance(records, dict) and file_checks_out(journal.records_path(index), records.get("bytes", -1),
                                                         records.get("checksum", ""))
