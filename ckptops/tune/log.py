"""``trials.jsonl``: every trial, one JSON line each, appended as soon as it is measured.

A search over a dozen candidates takes an hour on a CPU; an interrupted one should not start
over. The first line records the settings every figure depends on (models, prompts and their
split, generation, judge, scope); a rerun with the same settings reads the log and skips the
trials it holds, a rerun with different settings is refused (its figures would not be
comparable) and told to use another ``--out``. A torn last line (the process killed while
writing it) is ignored: that trial simply runs again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ckptops.errors import UsageError
from ckptops.tune.measure import Measurement
from ckptops.tune.space import Candidate

LOG_NAME = "trials.jsonl"
FORMAT = "ckptops.tune.trials/1"


def settings_fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TrialLog:
    """Reads the trials done so far and appends new ones (flushed line by line)."""

    def __init__(self, folder: Path, settings: dict[str, Any]) -> None:
        self.path = Path(folder) / LOG_NAME
        self.settings = settings
        self.fingerprint = settings_fingerprint(settings)
        self.done: dict[tuple[str, str], Measurement] = {}
        self.candidates: dict[str, Candidate] = {}
        self.references: dict[tuple[str, str], Measurement] = {}  # other models than candidates (the base)
        if self.path.is_file():
            self._read()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"format": FORMAT, "fingerprint": self.fingerprint, "settings": settings})

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):
                    break  # torn last line: that trial runs again
                raise UsageError(f"{self.path}:{number}: not valid JSON; move the file away to start over") from None
        if not records or records[0].get("format") != FORMAT:
            raise UsageError(f"{self.path}: not a ckptops tune log; use another --out")
        if records[0].get("fingerprint") != self.fingerprint:
            old = records[0].get("settings", {})
            changed = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
            raise UsageError(f"{self.path}: made with other settings ({', '.join(changed) or 'unknown'} differ); "
                             "use another --out, or move the log away to start over")
        for record in records[1:]:
            if "reference" in record:
                self.references[(record["split"], record["reference"])] = Measurement.from_dict(record["measurement"])
                continue
            candidate = Candidate(**record["candidate"])
            self.candidates[candidate.key] = candidate
            self.done[(record["split"], candidate.key)] = Measurement.from_dict(record["measurement"])
        # rewrite without a torn line so that appends start on a fresh line
        self.path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")

    def _append(self, record: dict) -> None:
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
