"""``--resume``: a journal in the staging folder, so that a run killed at any point and started
again with the same arguments finishes with the same bytes.

The journal (``journal.json``, written atomically) names the run by a key: the sha256 of the
parameters, the identity of every input and the output layout. When the streaming work is done it
records every output shard's sha256 and what the report needs (thresholds, counts, drift sums).
A resumed run looks for a staging folder of a dead run into the same OUT whose journal has the
same key: if its work is recorded as done and every shard's hash checks out, the shards are
reused and only the publish step runs; otherwise the work runs again in that folder (every shard
is rewritten from the start, so the output is the same bytes as an uninterrupted run).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ckptops.checkpoint.leftovers import is_live, staging_folders
from ckptops.checkpoint.resolve import full_sha256

NAME = "journal.json"


def run_key(parameters: dict, inputs: dict, layout: list) -> str:
    text = json.dumps({"parameters": parameters, "inputs": inputs, "layout": layout}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write(folder: Path, data: dict) -> None:
    tmp = Path(folder) / (NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as file:
        json.dump(data, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, Path(folder) / NAME)


def remove(folder: Path) -> None:
    try:
        (Path(folder) / NAME).unlink()
    except FileNotFoundError:
        pass


def find(out: Path, key: str) -> Path | None:
    """The staging folder of a dead run into ``out`` with this run's key (the newest), if any."""
    found = [f for f in staging_folders(out) if ".ckptops-tmp-" in f.name and not is_live(f)
             and (read(f) or {}).get("key") == key]
    return max(found, key=lambda f: f.stat().st_mtime) if found else None


file_sha256 = full_sha256  # a finished shard's hash, checked again before it is reused


def shards_check_out(folder: Path, recorded: dict[str, str]) -> bool:
    """Every recorded shard is there with the recorded sha256."""
    for name, digest in recorded.items():
        path = Path(folder) / name
        if not path.is_file() or file_sha256(path) != digest:
            return False
    return True
