"""The output folder of ``ckptops tune``: what a user reads after the search.

- ``pareto.md`` / ``pareto.json``: every tuning trial (safety figures, damage figures, whether it
  is on the Pareto front, why it fails the bounds), best first by the choice rule;
- ``heldout.md`` / ``report.json``: the chosen candidate, the unmodified target and the shipped
  defaults on the **held-out** prompts, with 95% Wilson intervals, plus the rule, the bounds
  and the choice;
- ``recipe.toml``: the chosen candidate as a recipe ``ckptops run`` accepts (absent when no
  candidate qualified);
- ``trials.jsonl``: the log of every trial, with every output and verdict (see :mod:`ckptops.tune.log`).

Each file is written to a temporary name and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ckptops.evaluate.judge import is_broken
from ckptops.recipe import validate
from ckptops.tune.choose import Limits, Trial, violations
from ckptops.tune.measure import Measurement
from ckptops.tune.space import Candidate


def write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def _ci(interval: dict[str, float]) -> str:
    if math.isnan(interval["estimate"]):
        return "-"
    return f"{100 * interval['estimate']:.1f} [{100 * interval['low']:.1f}, {100 * interval['high']:.1f}]"


def pareto_table(ranked: list[Trial], target: Measurement, front: set[str], limits: Limits, chosen: Candidate | None) -> str:
    """Markdown: one row per tuning trial, best first by the rule."""
    lines = [
        "| | scale | top-k | ICV alpha | compliance openings % | refusal % | broken % (all) | over-refusal % | KL | perplexity | Pareto | within bounds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| target | - | - | - | {_pct(target.openings)} | {_pct(target.refusal)} | {_pct(target.broken)} | "
        f"{_pct(target.rate('benign_refusal'))} | 0 | {_num(target.perplexity)} | | |",
    ]
    for trial in ranked:
        c, m = trial.candidate, trial.measurement
        why = violations(trial, target, limits)
        mark = "**chosen**" if chosen is not None and c.key == chosen.key else ""
        lines.append(
            f"| {mark} | {c.scale:g} | {c.top_k:g} | {c.alpha:g} | {_pct(m.openings)} | {_pct(m.refusal)} | "
            f"{_pct(m.broken)} | {_pct(m.rate('benign_refusal'))} | {_num(m.kl)} | {_num(m.perplexity)} | "
            f"{'yes' if c.key in front else ''} | {'yes' if not why else '; '.join(why)} |"
        )
    return "\n".join(lines)


def heldout_table(rows: list[tuple[str, Measurement]], target: Measurement) -> str:
    """Markdown: the held-out figures with 95% Wilson intervals."""
    lines = [
        "| model | compliance openings % [95% CI] | refusal % [95% CI] | broken % harmful [95% CI] "
        "| over-refusal % benign [95% CI] | broken % benign [95% CI] | broken % all | KL vs target | perplexity (change) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in rows:
        ci = m.intervals()
        ppl = _num(m.perplexity)
        if m.perplexity is not None and target.perplexity:
            ppl += f" ({100 * (m.perplexity / target.perplexity - 1):+.1f}%)"
        lines.append(
            f"| {name} | {_ci(ci['harmful_openings'])} | {_ci(ci['harmful_refusal'])} | {_ci(ci['harmful_broken'])} "
            f"| {_ci(ci['benign_refusal'])} | {_ci(ci['benign_broken'])} | {_pct(m.broken)} | {_num(m.kl)} | {ppl} |"
        )
    return "\n".join(lines)


def broken_examples(m: Measurement, base: Measurement | None = None, limit: int = 5) -> str:
    """Markdown: the broken answers behind a broken rate (the first ``limit``), so that a reader
    sees what the judge counted; with the base measured, how many of them theta_b breaks too
    (the same prompts: the base's own weakness; other prompts: damage the edit caused)."""
    broken = [o for o in m.outputs if is_broken(o.get("verdict"))]
    if not broken:
        return ""
    lines = [f"Broken answers ({len(broken)} of {m.n_harmful + m.n_benign}), the first {min(limit, len(broken))} "
             "(prompt, answer, the judge's reason; truncated):", ""]
    for o in broken[:limit]:
        lines.append(f"- {o['label']}: {json.dumps(o['prompt'][:80])} -> {json.dumps(o['output'][:120])} ({o['reason']})")
    if base is not None and base.outputs:
        base_broken = {o["prompt"] for o in base.outputs if is_broken(o.get("verdict"))}
        shared = sum(o["prompt"] in base_broken for o in broken)
        lines += ["", f"{shared} of the {len(broken)} broken prompts also break the base theta_b (which breaks "
                      f"{len(base_broken)}); the others are damage the edit caused, not the base's own weakness."]
    return "\n".join(lines)


def recipe_for(candidate: Candidate, models: dict[str, str], *, scope: str, exclude: list[str], icv_rule: str,
               icv_demos: str | None, out: str) -> str:
    """A ``ckptops run`` recipe that reproduces ``candidate`` (validated before it is written)."""
    data: dict[str, dict[str, Any]] = {
        "models": dict(models),
        "hdr": {"top_k": candidate.top_k, "scale": candidate.scale, "scope": scope, "exclude": list(exclude)},
        "icv": {"enabled": candidate.alpha > 0, "alpha": candidate.alpha if candidate.alpha > 0 else 0.12,
                "rule": icv_rule, "demos": icv_demos or ""},
        "output": {"out": out},
    }
    recipe = validate(data, "tune recipe")
    header = (f"# chosen by ckptops tune: {candidate.label()}\n"
              "# reproduce the chosen model with: ckptops run recipe.toml --out FOLDER\n")
    return header + recipe.to_toml()


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
