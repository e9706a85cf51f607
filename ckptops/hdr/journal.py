"""The journal of a sanitize run, in its staging folder: what a run killed at any point (``kill
-9`` included) had done, so that the same command with ``--resume`` continues it instead of
starting from zero (a multi-hour run on a large model) and writes the same bytes as a run that
was never interrupted.

Every run writes it, ``--resume`` or not: a user adds ``--resume`` after the crash, not before.
Without ``--resume`` a dead run's staging folder is removed as before (see
:mod:`ckptops.checkpoint.leftovers`), journal and all, so the journal changes nothing for them.

It lives in ``.ckptops-journal/`` inside the staging folder (removed before the folder becomes
OUT):

- ``journal.json``: the run's key, the sha256 of the parameters, the identity of every input and
  the output layout (a run with other arguments or inputs never continues it); what the pass
  needs before it starts, so that a resumed run neither samples nor selects again (the one-read
  pass's ``bands`` and the thresholds ``preselected`` before it, or the selection pass's
  ``selections``); the ``phase``: ``pass`` (finished shards hold the bytes the pass wrote),
  ``correcting`` (the one-read corrections, towards the ``exact`` thresholds recorded here, may
  be partly written over them), ``fallback`` (a group whose band missed is being rewritten: the
  shards are not reused).
- ``shard-NNNNN.json``: one per output shard the pass finished, written once the shard's last byte
  was: its size and checksum (:mod:`ckptops.checkpoint.checksum`) as the pass wrote it, and what it
  contributes to the end of the pass (see :mod:`ckptops.hdr.shard_log`). Written atomically, never
  synced: after a power cut a lost entry only means that shard is computed again, and a shard that
  did not reach the disk fails its checksum.
- ``shard-NNNNN.records``: that shard's one-read correction records.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ckptops.checkpoint import checksum
from ckptops.checkpoint.leftovers import is_live, staging_folders
from ckptops.jsontypes import dict_of, is_int, is_number, is_str, list_of, optional, row

DIR = ".ckptops-journal"
STATE = "journal.json"
#: a DirectFile shard killed before its final truncate ends in up to this much zero padding
PADDING = 4096


def run_key(parameters: dict, inputs: dict, layout: list, mode: str) -> str:
    """``mode``: how the pass runs (the one-read pass and the selection pass journal different things)."""
    text = json.dumps({"parameters": parameters, "inputs": inputs, "layout": layout, "mode": mode}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------- the journal's types
# A journal is this program's own file, but it sits on disk across a crash and may be damaged or
# edited: a value of another type (``"size": "12"``) must mean "not journaled" (that shard, or
# the whole folder, is computed again), never a TypeError deep in the resumed run (the predicates:
# :mod:`ckptops.jsontypes`).

_SELECTION = row(optional(is_number), is_int, is_int)
#: what ``journal.json`` may hold besides its key (see the module docstring): absent, or these types
_STATE = {
    "phase": lambda v: v in ("pass", "correcting", "fallback"),
    "bands": dict_of(row(is_int, is_int, is_int, is_int)),  # lo, size, write, shift
    "preselected": dict_of(_SELECTION),
    "exact": dict_of(is_int),
    "selections": dict_of(row(optional(is_number), is_int, is_int, optional(list_of(is_str)))),
}
_STATE["partial_selections"] = _STATE["selections"]


def well_formed(state: dict) -> bool:
    """Whether every field of a ``journal.json`` has the type this version writes."""
    return all(key not in state or check(state[key]) for key, check in _STATE.items())


def read(folder: Path) -> dict | None:
    """The journal state of a staging folder, None where there is none (or it is unreadable)."""
    return _read_json(Path(folder) / DIR / STATE)


def _write_atomic(path: Path, data: dict, sync: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as file:
        json.dump(data, file)
        if sync:
            file.flush()
            os.fsync(file.fileno())
    os.replace(tmp, path)


class Journal:
    """The journal of one staging folder (see the module docstring)."""

    def __init__(self, folder: Path, state: dict) -> None:
        self.folder = Path(folder)
        self.dir = self.folder / DIR
        self.state = state

    @classmethod
    def start(cls, folder: Path, key: str) -> Journal:
        """The folder's journal when it has this key (a killed run ``--resume`` continues), else a
        new one (anything an earlier journal recorded is dropped)."""
        state = read(folder)
        same = state is not None and state.get("key") == key and well_formed(state)
        journal = cls(folder, state if same else {"key": key})
        if journal.state is not state:
            shutil.rmtree(journal.dir, ignore_errors=True)
            journal.dir.mkdir()
            journal.update(phase="pass")
        return journal

    @property
    def phase(self) -> str:
        return self.state.get("phase", "pass")

    def update(self, **fields) -> None:
        """Record ``fields`` in ``journal.json`` (synced: it is written a few times a run)."""
        self.state.update(fields)
        _write_atomic(self.dir / STATE, self.state, sync=True)

    def entry_path(self, index: int) -> Path:
        return self.dir / f"shard-{index:05d}.json"

    def records_path(self, index: int) -> Path:
        return self.dir / f"shard-{index:05d}.records"

    def write_entry(self, index: int, entry: dict) -> None:
        _write_atomic(self.entry_path(index), entry, sync=False)

    def entries(self) -> dict[int, dict]:
        """The finished shards' entries, by shard index (unreadable ones left out)."""
        found = {}
        for path in sorted(self.dir.glob("shard-*.json")):
            entry = _read_json(path)
            if entry is not None:
                found[int(path.stem.split("-")[1])] = entry
        return found

    def drop(self, keep: set[int] = frozenset()) -> None:
        """Forget every finished shard but ``keep`` (entries and records)."""
        for path in list(self.dir.glob("shard-*")):
            try:
                index = int(path.name[6:11])
            except ValueError:
                index = -1
            if index not in keep:
                path.unlink(missing_ok=True)


def remove(folder: Path) -> None:
    """Remove the journal (the folder is about to become OUT)."""
    shutil.rmtree(Path(folder) / DIR, ignore_errors=True)


def find(out: Path, key: str) -> Path | None:
    """The staging folder of a dead run into ``out`` with this run's key (the newest), if any."""
    found = [f for f in staging_folders(out) if ".ckptops-tmp-" in f.name and not is_live(f)
             and (read(f) or {}).get("key") == key]
    return max(found, key=lambda f: f.stat().st_mtime) if found else None


def file_checks_out(path: Path, size: int, recorded: str, padded: bool = False) -> bool:
    """``path`` holds ``size`` bytes with the checksum ``recorded``. ``padded``: an output shard, which may end
    in the zero padding of a run killed before it truncated the file; that is cut off here."""
    try:
        actual = os.stat(path).st_size
    except OSError:
        return False
    if not (actual == size or (padded and size < actual < size + PADDING)):
        return False
    if not checksum.matches(path, size, recorded):
        return False
    if actual != size:
        os.truncate(path, size)
    return True
