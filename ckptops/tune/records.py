"""What one line of ``trials.jsonl`` may hold: checked before a rerun trusts it.

The log is plain JSON lines that a user can open, edit or damage; a rerun reads every figure in it
back into the report and the choice. A record of the wrong shape must be refused as one line naming
the line, before any model loads -- not surface as a ``TypeError`` deep in the report code after
minutes of new trials, and never be chosen (a hand-edited negative scale would ADD the harm vector).
The checks mirror what :mod:`ckptops.tune.log` writes: :meth:`Candidate.as_dict` and
:meth:`Measurement.as_dict`.
"""

from __future__ import annotations

import math
from typing import Any

from ckptops.jsontypes import is_int, is_number
from ckptops.tune.measure import Measurement
from ckptops.tune.space import Candidate

SPLITS = ("tune", "heldout")
#: every count a measurement holds (:func:`ckptops.tune.measure.measure` fills them all)
COUNT_KEYS = tuple(f"{label}_{kind}" for label in ("harmful", "benign")
                   for kind in ("refusal", "compliance", "broken", "openings"))
OUTPUT_TEXTS = ("label", "prompt", "output", "verdict", "reason")


class BadRecord(ValueError):
    """What is wrong with one record (the caller names the file and line)."""


def _count(value: Any, what: str) -> int:
    if not is_int(value) or value < 0:
        raise BadRecord(f"{what} is {value!r}, not a count")
    return value


def candidate(data: Any) -> Candidate:
    """The candidate of a trial record: exactly ``scale``, ``top_k`` and ``alpha``, numbers in the
    ranges ``tune`` accepts (the target itself is scale 0, top-k 1, alpha 0)."""
    if not isinstance(data, dict) or set(data) != {"scale", "top_k", "alpha"}:
        got = ", ".join(sorted(map(str, data))) if isinstance(data, dict) else type(data).__name__
        raise BadRecord(f"candidate must hold exactly scale, top_k and alpha (got {got or 'nothing'})")
    for key in ("scale", "top_k", "alpha"):
        if not is_number(data[key]) or not math.isfinite(data[key]):
            raise BadRecord(f"candidate {key} is {data[key]!r}, not a finite number")
    made = Candidate(top_k=float(data["top_k"]), scale=float(data["scale"]), alpha=float(data["alpha"]))
    if made.scale < 0:
        raise BadRecord(f"candidate scale {made.scale:g} is negative (HDR would ADD the harm vector)")
    if not 0 < made.top_k <= 1:
        raise BadRecord(f"candidate top_k {made.top_k:g} is not a fraction in (0, 1]")
    if made.alpha < 0:
        raise BadRecord(f"candidate alpha {made.alpha:g} is negative")
    return made


def measurement(data: Any) -> Measurement:
    """A measurement as :meth:`Measurement.as_dict` writes it (the derived rates are recomputed
    from the counts, so only the counts, sizes and figures are checked)."""
    if not isinstance(data, dict):
        raise BadRecord(f"measurement is {type(data).__name__}, not an object")
    sizes = {label: _count(data.get(f"n_{label}"), f"measurement n_{label}") for label in ("harmful", "benign")}
    counts = data.get("counts")
    if not isinstance(counts, dict):
        raise BadRecord("measurement counts missing or not an object")
    for key in COUNT_KEYS:
        value = _count(counts.get(key), f"measurement counts {key}")
        if value > sizes[key.split("_")[0]]:
            raise BadRecord(f"measurement counts {key} is {value}, more than its {sizes[key.split('_')[0]]} prompts")
    for key, value in counts.items():
        if key not in COUNT_KEYS:
            _count(value, f"measurement counts {key}")
    for key in ("kl", "perplexity"):
        if data.get(key) is not None and not is_number(data[key]):
            raise BadRecord(f"measurement {key} is {data[key]!r}, not a number")
    seconds = data.get("seconds", {})
    if not isinstance(seconds, dict) or not all(is_number(v) for v in seconds.values()):
        raise BadRecord("measurement seconds is not an object of numbers")
    outputs = data.get("outputs", [])
    if not isinstance(outputs, list):
        raise BadRecord("measurement outputs is not a list")
    for index, output in enumerate(outputs):
        if not isinstance(output, dict) or not all(isinstance(output.get(k), str) for k in OUTPUT_TEXTS):
            raise BadRecord(f"measurement outputs[{index}] lacks one of {', '.join(OUTPUT_TEXTS)} as text")
    return Measurement.from_dict(data)


def trial(record: Any) -> tuple[str, Candidate | str, Measurement]:
    """``(split, candidate, measurement)`` of a trial record, or ``(split, name, measurement)`` of a
    reference record (a model that is not a candidate: ``"base"``)."""
    if not isinstance(record, dict):
        raise BadRecord(f"a {type(record).__name__}, not a trial record")
    if record.get("split") not in SPLITS:
        raise BadRecord(f"split is {record.get('split')!r}, not one of {', '.join(SPLITS)}")
    if "reference" in record:
        if not isinstance(record["reference"], str) or "candidate" in record:
            raise BadRecord("a reference record names its model as text and has no candidate")
        return record["split"], record["reference"], measurement(record.get("measurement"))
    if "candidate" not in record:
        raise BadRecord("neither a candidate nor a reference record")
    return record["split"], candidate(record["candidate"]), measurement(record.get("measurement"))
