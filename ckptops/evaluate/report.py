"""What an evaluation produced, as data, as a terminal table, and as a JSON file.

The JSON keeps every prompt, output and verdict, so that anyone can re-read the outputs, audit
the judge, or re-judge them with a better classifier; the table keeps only the rates with their
95% Wilson intervals, per prompt set and label.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from ckptops import _startup
from ckptops.evaluate.judge import VERDICTS, is_broken
from ckptops.evaluate.stats import Interval, paired_difference_interval, wilson_interval

REPORT_FORMAT = "ckptops.eval/1"
COMPARE_FORMAT = "ckptops.eval.compare/1"

#: What each rate means, printed under the tables and stored in the JSON.
LEGEND = (
    "refusal on harmful prompts: higher is safer; refusal on benign prompts: over-refusal, lower is better; "
    "broken: empty or degenerate (looping) outputs, never counted as refusals; [low, high]: 95% Wilson interval"
)


@dataclass(frozen=True)
class PromptResult:
    """One prompt, the model's answer and the judge's verdict."""

    set_name: str
    row: int
    label: str
    prompt: str
    output: str
    verdict: str
    reason: str
    new_tokens: int
    finished: bool
    meta: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "set": self.set_name,
            "row": self.row,
            "label": self.label,
            "prompt": self.prompt,
            "output": self.output,
            "verdict": self.verdict,
            "reason": self.reason,
            "new_tokens": self.new_tokens,
            "finished": self.finished,
            "meta": self.meta,
        }

    @property
    def refused(self) -> bool:
        return self.verdict == "refusal"

    @property
    def broken(self) -> bool:
        return is_broken(self.verdict)


@dataclass(frozen=True)
class GroupSummary:
    """Verdict counts and rates for the prompts of one label in one set (or in all sets)."""

    set_name: str
    label: str
    n: int
    counts: dict[str, int]
    refusal: Interval
    broken: Interval

    def as_dict(self) -> dict[str, Any]:
        return {
            "set": self.set_name,
            "label": self.label,
            "n": self.n,
            "counts": dict(self.counts),
            "refusal_rate": self.refusal.as_dict(),
            "broken_rate": self.broken.as_dict(),
        }


ALL_SETS = "all"


def group_keys(results: Sequence[PromptResult]) -> list[tuple[str, str]]:
    """(set, label) groups in first-seen order, plus an ``all`` row per label seen in 2+ sets."""
    keys: list[tuple[str, str]] = []
    for r in results:
        if (r.set_name, r.label) not in keys:
            keys.append((r.set_name, r.label))
    for label in ("harmful", "benign"):
        sets = {s for s, lab in keys if lab == label}
        if len(sets) > 1:
            keys.append((ALL_SETS, label))
    return keys


def select(results: Sequence[PromptResult], set_name: str, label: str) -> list[PromptResult]:
    return [r for r in results if r.label == label and (set_name == ALL_SETS or r.set_name == set_name)]


def summarize(results: Sequence[PromptResult]) -> list[GroupSummary]:
    """One :class:`GroupSummary` per group of :func:`group_keys`."""
    summaries = []
    for set_name, label in group_keys(results):
        rows = select(results, set_name, label)
        counts = {v: 0 for v in VERDICTS}
        for r in rows:
            counts[r.verdict] = counts.get(r.verdict, 0) + 1
        n = len(rows)
        summaries.append(
            GroupSummary(
                set_name=set_name,
                label=label,
                n=n,
                counts=counts,
                refusal=wilson_interval(counts["refusal"], n),
                broken=wilson_interval(counts["empty"] + counts["degenerate"], n),
            )
        )
    return summaries


@dataclass
class ModelEvaluation:
    """Everything measured on one model (with or without an ICV)."""

    model: str
    icv: str | None
    results: list[PromptResult]
    generation: dict[str, Any]
    perplexity: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def summaries(self) -> list[GroupSummary]:
        return summarize(self.results)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "icv": self.icv,
            "generation": self.generation,
            "perplexity": self.perplexity,
            "notes": list(self.notes),
            "summary": [s.as_dict() for s in self.summaries],
            "results": [r.as_dict() for r in self.results],
        }


@dataclass(frozen=True)
class GroupDelta:
    """Model B minus model A on the same prompts, with paired 95% intervals."""

    set_name: str
    label: str
    n: int
    refusal: Interval
    broken: Interval

    def as_dict(self) -> dict[str, Any]:
        return {
            "set": self.set_name,
            "label": self.label,
            "n": self.n,
            "refusal_rate_delta": self.refusal.as_dict(),
            "broken_rate_delta": self.broken.as_dict(),
            "method": "Newcombe (1998) method 10 for paired proportions, from Wilson intervals",
        }


def paired_deltas(a: Sequence[PromptResult], b: Sequence[PromptResult]) -> list[GroupDelta]:
    """Per-group differences (b - a); ``a`` and ``b`` must be the same prompts in the same order."""
    if [(r.set_name, r.row) for r in a] != [(r.set_name, r.row) for r in b]:
        raise ValueError("the two evaluations did not run the same prompts in the same order")
    deltas = []
    for set_name, label in group_keys(a):
        rows_a, rows_b = select(a, set_name, label), select(b, set_name, label)
        deltas.append(
            GroupDelta(
                set_name=set_name,
                label=label,
                n=len(rows_a),
                refusal=paired_difference_interval([r.refused for r in rows_a], [r.refused for r in rows_b]),
                broken=paired_difference_interval([r.broken for r in rows_a], [r.broken for r in rows_b]),
            )
        )
    return deltas


@dataclass
class EvalReport:
    """The result of ``ckptops eval --model``."""

    evaluation: ModelEvaluation
    judge: str
    settings: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            **_provenance(),
            "judge": self.judge,
            "settings": self.settings,
            "legend": LEGEND,
            **self.evaluation.as_dict(),
        }

    def table(self) -> str:
        return render_table(self.evaluation)


@dataclass
class CompareReport:
    """The result of ``ckptops eval --compare A B``: both evaluations and their paired deltas."""

    a: ModelEvaluation
    b: ModelEvaluation
    judge: str
    settings: dict[str, Any]

    @property
    def deltas(self) -> list[GroupDelta]:
        return paired_deltas(self.a.results, self.b.results)

    def as_dict(self) -> dict[str, Any]:
        ppl_ratio, _ = perplexity_ratio(self.a.perplexity, self.b.perplexity)
        return {
            "format": COMPARE_FORMAT,
            **_provenance(),
            "judge": self.judge,
            "settings": self.settings,
            "legend": LEGEND,
            "models": {"a": self.a.as_dict(), "b": self.b.as_dict()},
            "deltas": [d.as_dict() for d in self.deltas],
            "perplexity_ratio": ppl_ratio,
        }

    def table(self) -> str:
        return render_compare_table(self.a, self.b, self.deltas)


# --------------------------------------------------------------------------- rendering


def pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}%"


def pct_interval(interval: Interval) -> str:
    if math.isnan(interval.estimate):
        return "-"
    return f"{100 * interval.estimate:5.1f}% [{100 * interval.low:.1f}, {100 * interval.high:.1f}]"


def signed_interval(interval: Interval) -> str:
    if math.isnan(interval.estimate):
        return "-"
    return f"{100 * interval.estimate:+.1f} pts [{100 * interval.low:+.1f}, {100 * interval.high:+.1f}]"


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _describe(evaluation: ModelEvaluation) -> str:
    text = evaluation.model
    if evaluation.icv:
        text += f" + ICV {evaluation.icv}"
    return text


def _ppl_line(evaluation: ModelEvaluation) -> str | None:
    p = evaluation.perplexity
    if not p:
        return None
    return (
        f"perplexity {p['perplexity']:.3f} on {p['path']} "
        f"({p['tokens_scored']} tokens, window {p['window']}, stride {p['stride']})"
    )


def render_table(evaluation: ModelEvaluation) -> str:
    """The terminal table for one model."""
    header = ["set", "label", "n", "refusal [95% CI]", "compliance", "broken [95% CI]"]
    rows = []
    for s in evaluation.summaries:
        rows.append(
            [
                s.set_name,
                s.label,
                str(s.n),
                pct_interval(s.refusal),
                pct(s.counts["compliance"] / s.n if s.n else math.nan),
                pct_interval(s.broken),
            ]
        )
    lines = [f"model: {_describe(evaluation)}", _grid(header, rows)]
    ppl = _ppl_line(evaluation)
    if ppl:
        lines.append(ppl)
    gen = evaluation.generation
    if gen:
        lines.append(
            f"generated {gen.get('new_tokens', 0)} tokens for {gen.get('prompts', 0)} prompts "
            f"in {gen.get('seconds', 0):.1f} s ({gen.get('tokens_per_second', 0):.1f} tok/s)"
        )
    lines.extend(f"note: {n}" for n in evaluation.notes)
    lines.append(LEGEND)
    return "\n".join(lines)


def perplexity_ratio(a: dict | None, b: dict | None) -> tuple[float | None, str | None]:
    """B's perplexity over A's, or None and why not. A perplexity is per token: it compares only
    over the same tokens (same text, same tokenizer) and the same window and stride; two
    tokenizers split the file differently, and a ratio of their perplexities means nothing."""
    if not a or not b:
        return None, "perplexity of one model is missing"
    if (a.get("window"), a.get("stride")) != (b.get("window"), b.get("stride")):
        return None, (f"different windows: A {a.get('window')}/{a.get('stride')}, "
                      f"B {b.get('window')}/{b.get('stride')} (window/stride)")
    if a.get("tokens_sha256") != b.get("tokens_sha256"):
        return None, (f"the two tokenizers split the file differently: A {a.get('tokens_scored')} tokens, "
                      f"B {b.get('tokens_scored')}")
    return b["perplexity"] / a["perplexity"], None


def render_compare_table(a: ModelEvaluation, b: ModelEvaluation, deltas: Sequence[GroupDelta]) -> str:
    """The terminal table for ``--compare``: both rates and the paired difference B - A."""
    header = ["set", "label", "n", "A refusal", "B refusal", "B-A refusal [95% CI]", "A broken", "B broken", "B-A broken [95% CI]"]
    sa = {(s.set_name, s.label): s for s in a.summaries}
    sb = {(s.set_name, s.label): s for s in b.summaries}
    rows = []
    for d in deltas:
        ga, gb = sa[(d.set_name, d.label)], sb[(d.set_name, d.label)]
        rows.append(
            [
                d.set_name,
                d.label,
                str(d.n),
                pct(ga.refusal.estimate),
                pct(gb.refusal.estimate),
                signed_interval(d.refusal),
                pct(ga.broken.estimate),
                pct(gb.broken.estimate),
                signed_interval(d.broken),
            ]
        )
    lines = [f"A: {_describe(a)}", f"B: {_describe(b)}", _grid(header, rows)]
    for name, evaluation in (("A", a), ("B", b)):
        ppl = _ppl_line(evaluation)
        if ppl:
            lines.append(f"{name} {ppl}")
    if a.perplexity and b.perplexity:
        ratio, why_not = perplexity_ratio(a.perplexity, b.perplexity)
        lines.append(f"perplexity B/A: {ratio:.3f} ({100 * (ratio - 1):+.1f}%)" if ratio is not None
                     else f"perplexity B/A: not compared ({why_not})")
    for name, evaluation in (("A", a), ("B", b)):
        lines.extend(f"note ({name}): {n}" for n in evaluation.notes)
    lines.append(LEGEND)
    lines.append("B-A: paired difference on the same prompts, 95% interval by Newcombe's method 10 (Wilson-based)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- JSON


def _provenance() -> dict[str, Any]:
    from ckptops import __version__

    return {"ckptops_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def to_json(report: EvalReport | CompareReport) -> str:
    """The report as JSON text (NaN and infinities as null, so that any JSON reader accepts it)."""
    return json.dumps(_nan_to_none(report.as_dict()), ensure_ascii=False, indent=2, default=_json_default) + "\n"


def write_json(report: EvalReport | CompareReport, path: str | Path) -> Path:
    """Write the report as JSON, atomically: a crash leaves no half-written file."""
    path = Path(path)
    text = to_json(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
        _startup.published(path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
