"""Temporary output folders left behind by interrupted runs: find them, remove the dead ones.

A run builds its output in ``.OUT.ckptops-tmp-XXXXXXXX`` beside ``OUT`` (see
:mod:`ckptops.checkpoint.publish`). A run killed hard (``kill -9``, power loss) cannot delete it,
and each such folder may be as large as the model. Every staging folder therefore holds an owner
file naming the process that writes it (host, pid and the process's start time, so that a
recycled pid is not mistaken for the owner). A later run into the same ``OUT`` removes the
folders whose owner is gone and reports, without touching them, those of a run still alive.

``--overwrite`` renames the old ``OUT`` to ``.OUT.ckptops-old-XXXXXXXX`` just before the new one
takes its name, and deletes it right after. A run killed between the two renames leaves ``OUT``
missing and the old one only under that hidden name: the sweep then leaves it alone and warns,
since it may be the user's only copy (once ``OUT`` exists again it is an ordinary leftover). Beside an existing ``OUT`` it is a replaced output whose
deletion was cut short, and is removed (a link, when ``OUT`` was a symlink: never its target).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

OWNER_FILE = ".ckptops-owner"
#: a folder without an owner file this young may belong to a run that is just starting
GRACE_SECONDS = 60.0


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot, Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # another machine's run (shared disk): not ours to judge
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = _process_start(pid)
    return started is None or owner.get("started") in (None, started)


def claim(folder: Path) -> None:
    """Mark ``folder`` as written by this process (call right after creating it)."""
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid())}
    tmp = folder / (OWNER_FILE + ".tmp")
    tmp.write_text(json.dumps(owner), encoding="utf-8")
    os.replace(tmp, folder / OWNER_FILE)


def release(folder: Path) -> None:
    """Remove the owner file (before the folder is moved into place as the output)."""
    try:
        (folder / OWNER_FILE).unlink()
    except FileNotFoundError:
        pass


def owner_of(folder: Path) -> dict | None:
    try:
        return json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@dataclass
class Leftovers:
    """What :func:`sweep` found: folders removed (their run is gone), folders of live runs, and
    former outputs set aside by a killed ``--overwrite`` while OUT is missing (left alone)."""

    removed: list[str] = field(default_factory=list)
    removed_bytes: int = 0
    live: list[str] = field(default_factory=list)
    set_aside: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"removed": self.removed, "removed_bytes": self.removed_bytes, "live": self.live,
                "set_aside": self.set_aside}


def staging_folders(out: Path) -> list[Path]:
    """The temporary folders any run into ``out`` may have left beside it (a replaced OUT that
    was a symlink is set aside as that symlink)."""
    out = Path(out).expanduser()
    parent = out.absolute().parent
    if not parent.is_dir():
        return []
    staging, replaced = f".{out.name}.ckptops-tmp-", f".{out.name}.ckptops-old-"
    return sorted(p for p in parent.iterdir()
                  if (p.name.startswith(staging) and p.is_dir() and not p.is_symlink())
                  or (p.name.startswith(replaced) and (p.is_symlink() or p.is_dir())))


def is_live(folder: Path) -> bool:
    owner = None if folder.is_symlink() else owner_of(folder)
    if owner is None:
        try:
            return time.time() - folder.lstat().st_mtime < GRACE_SECONDS
        except OSError:
            return False
    return _alive(owner)


def _size(folder: Path) -> int:
    if folder.is_symlink():
        return 0
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def remove_folder_or_link(folder: Path) -> None:
    """Delete a leftover or a replaced OUT: a folder with what it holds, or, for an OUT that was a
    symbolic link to a folder, the link only, never the folder it points to (that is not ours)."""
    if folder.is_symlink():
        try:
            folder.unlink()
        except FileNotFoundError:
            pass
    else:
        shutil.rmtree(folder, ignore_errors=True)


def _is_only_copy(folder: Path, out: Path) -> bool:
    """``folder`` is a former ``out`` set aside by an ``--overwrite`` killed before the new one
    took its place: ``out`` is missing, so this may be the user's only copy of it."""
    return ".ckptops-old-" in folder.name and not os.path.lexists(out)


def sweep(out: Path, keep: Path | None = None) -> Leftovers:
    """Remove the staging folders of dead runs into ``out``; list those of live runs.
    ``keep``: a folder to leave alone (a run's own, or one a resume reuses)."""
    out = Path(out).expanduser()
    found = Leftovers()
    for folder in staging_folders(out):
        if keep is not None and folder.resolve() == Path(keep).resolve():
            continue
        if _is_only_copy(folder, out):
            found.set_aside.append(str(folder))
            warnings.warn(f"{folder} holds the previous {out}, set aside by an --overwrite run that was killed before "
                          f"it finished ({out} is missing): left alone, but once {out} exists again a later run removes "
                          f"it; to keep it, rename it, e.g. mv '{folder}' '{out}.previous'",
                          stacklevel=2)
            continue
        if is_live(folder):
            found.live.append(str(folder))
            continue
        size = _size(folder)
        remove_folder_or_link(folder)
        if not os.path.lexists(folder):
            found.removed.append(str(folder))
            found.removed_bytes += size
    return found
