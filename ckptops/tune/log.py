"""``trials.jsonl``: every trial, one JSON line each, appended as soon as it is measured.

A search over a dozen candidates takes an hour on a CPU; an interrupted one should not start
over. The first line records the settings every figure depends on (models by content, prompts
and their split, generation, judge, scope); a rerun with the same settings reads the log and
skips the trials it holds, a rerun with different settings is refused (its figures would not be
comparable) and told to use another ``--out``. Every record is checked
(:mod:`ckptops.tune.records`) before any model loads. A torn last line (the process killed while
writing it: broken JSON or a cut UTF-8 character) is ignored and cut off: that trial simply runs
again.

The log is read when the object is made (before the model loads) but a new one is written only
with its first trial: a run that fails while loading the model leaves no log behind.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ckptops import _startup
from ckptops.errors import UsageError
from ckptops.tune import records
from ckptops.tune.measure import Measurement
from ckptops.tune.space import TARGET, Candidate

LOG_NAME = "trials.jsonl"
FORMAT = "ckptops.tune.trials/2"
#: version 1 recorded the models by path: its trials cannot be matched to models identified by content
OLD_FORMATS = ("ckptops.tune.trials/1",)
START_OVER = "move the file away to start over"


def settings_fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TrialLog:
    """Reads the trials done so far and appends new ones (flushed line by line)."""

    def __init__(self, folder: Path, settings: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOG_NAME
        self.settings = settings
        self.fingerprint = settings_fingerprint(settings)
        self.done: dict[tuple[str, str], Measurement] = {}
        self.candidates: dict[str, Candidate] = {}
        self.references: dict[tuple[str, str], Measurement] = {}  # other models than candidates (the base)
        self._new = not self.path.is_file() or not self._read()
        if not self._new:
            self._kept()

    def _read(self) -> bool:
        """Load the log (False: it holds no record yet, so it is written anew)."""
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        found: list[tuple[int, Any]] = []
        keep, offset = len(data), 0
        for number, raw in enumerate(lines, start=1):
            start, offset = offset, offset + len(raw) + 1
            if not raw.strip():
                continue
            try:
                found.append((number, json.loads(raw.decode("utf-8"))))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                if not any(line.strip() for line in lines[number:]):
                    keep = start  # torn last line: that trial runs again
                    break
                raise UsageError(f"{self.path}:{number}: not a line of JSON text; {START_OVER}") from None
        if not found:
            self._cut(data, 0)
            return False
        number, header = found[0]
        if isinstance(header, dict) and header.get("format") in OLD_FORMATS:
            raise UsageError(f"{self.path}:{number}: written by an earlier ckptops, which recorded the models by "
                             "path, not by content, so its trials cannot be matched to these models; use another "
                             f"--out, or {START_OVER}")
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise UsageError(f"{self.path}:{number}: not a ckptops tune log (its first line is not the "
                             f"{FORMAT} format record); use another --out, or {START_OVER}")
        old = header.get("settings")
        if not isinstance(old, dict) or not isinstance(header.get("fingerprint"), str):
            raise UsageError(f"{self.path}:{number}: the format record lacks its settings; {START_OVER}")
        if header["fingerprint"] != self.fingerprint:
            changed = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
            raise UsageError(f"{self.path}: made with other settings ({', '.join(changed) or 'unknown'} differ); "
                             "use another --out, or move the log away to start over")
        for number, record in found[1:]:
            try:
                split, what, measurement = records.trial(record)
            except records.BadRecord as exc:
                raise UsageError(f"{self.path}:{number}: {exc}; {START_OVER}") from None
            if isinstance(what, str):
                self.references[(split, what)] = measurement
            else:
                self.candidates[what.key] = what
                self.done[(split, what.key)] = measurement
        self._cut(data, keep)
        return True

    def _cut(self, data: bytes, keep: int) -> None:
        """Drop a torn last line, and end the last record with a newline, so that appends start
        on a fresh line (one truncate: a kill here loses nothing the log held whole)."""
        if keep == len(data) and (not data or data.endswith(b"\n")):
            return
        with self.path.open("r+b") as handle:
            handle.truncate(keep)
            if keep and not data[:keep].endswith(b"\n"):
                handle.seek(keep)
                handle.write(b"\n")

    def _kept(self) -> None:
        """From here OUT holds this log: an interrupt leaves it (by design), and says so."""
        _startup.interrupt_note(self.folder, lambda: (
            f"keeps the {self._candidates_measured()} candidate(s) measured so far in {LOG_NAME} (with the "
            "target's figures); rerun the same command to continue"))

    def _candidates_measured(self) -> int:
        """Search candidates in the log, counted as the summary counts them (not the target's row
        nor held-out rows)."""
        return sum(1 for (split, key) in self.done if split == "tune" and self.candidates[key] != TARGET)

    def _append(self, record: dict) -> None:
        if self._new:  # the first trial: the log starts with its settings
            self._new = False
            self.folder.mkdir(parents=True, exist_ok=True)
            with self.path.open("w", encoding="utf-8") as handle:
                handle.write(json.dumps({"format": FORMAT, "fingerprint": self.fingerprint, "settings": self.settings},
                                        default=str) + "\n")
            self._kept()
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
            handle.flush()

    def logged(self, split: str) -> list[tuple[Candidate, Measurement]]:
        """Every trial of ``split`` in the log, in the order they were run."""
        return [(self.candidates[key], m) for (part, key), m in self.done.items() if part == split]

    def get(self, split: str, candidate: Candidate) -> Measurement | None:
        return self.done.get((split, candidate.key))

    def add(self, split: str, candidate: Candidate, measurement: Measurement) -> None:
        self.done[(split, candidate.key)] = measurement
        self.candidates[candidate.key] = candidate
        self._append({"split": split, "candidate": candidate.as_dict(), "label": candidate.label(),
                      "measurement": measurement.as_dict(with_outputs=True)})

    def get_reference(self, split: str, name: str) -> Measurement | None:
        return self.references.get((split, name))

    def add_reference(self, split: str, name: str, measurement: Measurement) -> None:
        """Log a model that is not a candidate (``"base"``: theta_b itself, the yardstick)."""
        self.references[(split, name)] = measurement
        self._append({"split": split, "reference": name, "measurement": measurement.as_dict(with_outputs=True)})
