"""The prompts ``tune`` searches on and the held-out prompts it reports on.

A search that reports the figures it optimised overstates them (the best of nine noisy
measurements is optimistic). So each prompt file is split, by a seeded shuffle, into a tuning
part and a held-out part that the search never sees; or the held-out prompts come from separate
files. Prompts are de-duplicated by text first, so that no prompt can sit on both sides; a prompt
in both the harmful and the benign files is refused (its verdicts would count for both labels), and
so is a held-out prompt the search saw under either label.

Files are read with :func:`ckptops.evaluate.prompts.load_prompt_set` (JSON lines or CSV). A file
with a ``label`` column (XSTest: ``safe`` / ``unsafe``) contributes only its rows of the wanted
label: XSTest's safe rows serve as benign prompts, its unsafe rows as harmful ones. An unknown
label value is an error naming the file and line.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ckptops.errors import UsageError
from ckptops.evaluate.prompts import Prompt, load_prompt_set, parse_label


@dataclass(frozen=True)
class PromptSplit:
    """Tuning and held-out prompts of both labels."""

    tune_harmful: tuple[Prompt, ...]
    tune_benign: tuple[Prompt, ...]
    held_harmful: tuple[Prompt, ...]
    held_benign: tuple[Prompt, ...]

    def part(self, which: str) -> tuple[tuple[Prompt, ...], tuple[Prompt, ...]]:
        """(harmful, benign) prompts of ``"tune"`` or ``"heldout"``."""
        return (self.tune_harmful, self.tune_benign) if which == "tune" else (self.held_harmful, self.held_benign)

    def describe(self) -> dict:
        return {
            "tune": {"harmful": len(self.tune_harmful), "benign": len(self.tune_benign)},
            "heldout": {"harmful": len(self.held_harmful), "benign": len(self.held_benign)},
        }


def read_labelled(path: str | Path, label: str) -> list[Prompt]:
    """The prompts of ``path`` that carry ``label`` (all rows when the file has no label column),
    de-duplicated by text, in file order."""
    loaded = load_prompt_set(path, label=label)
    kept: dict[str, Prompt] = {}
    for prompt in loaded.prompts:
        raw = prompt.meta.get("label")
        if raw is not None and not (isinstance(raw, str) and not raw.strip()):
            row_label = parse_label(raw, where=f"{path}:{prompt.row}: label")
            if row_label != label:
                continue
        kept.setdefault(prompt.text.strip(), prompt)
    if not kept:
        raise UsageError(f"{path}: no {label} prompts (its label column has none)")
    return list(kept.values())


def split(prompts: list[Prompt], holdout: float, seed: int, name: str) -> tuple[list[Prompt], list[Prompt]]:
    """(tuning, held-out): a seeded shuffle, the first ``round(n * holdout)`` held out.

    The shuffle depends only on ``seed`` and the prompt texts' order in the file, so a rerun
    with the same arguments gets the same parts. Each part keeps at least one prompt."""
    if len(prompts) < 2:
        raise UsageError(f"{name}: {len(prompts)} prompt(s); need at least 2 to split off held-out prompts "
                         "(or pass separate --holdout-harmful/--holdout-benign files)")
    order = list(range(len(prompts)))
    random.Random(f"ckptops-tune:{seed}:{name}").shuffle(order)
    n_held = min(len(prompts) - 1, max(1, round(len(prompts) * holdout)))
    held = sorted(order[:n_held])
    tune = sorted(order[n_held:])
    return [prompts[i] for i in tune], [prompts[i] for i in held]


def _limited(prompts: list[Prompt], limit: int | None, seed: int, name: str) -> list[Prompt]:
    """At most ``limit`` prompts, a seeded sample (a file's first rows are often one category)."""
    if limit is None or len(prompts) <= limit:
        return prompts
    order = list(range(len(prompts)))
    random.Random(f"ckptops-tune-limit:{seed}:{name}").shuffle(order)
    return [prompts[i] for i in sorted(order[:limit])]


def _overlap(first: list[Prompt], second: list[Prompt]) -> tuple[int, str]:
    """How many prompt texts ``first`` shares with ``second``, and the first shared one (in
    ``first``'s order)."""
    seen = {p.text.strip() for p in second}
    shared = [p.text.strip() for p in first if p.text.strip() in seen]
    return len(shared), shared[0] if shared else ""


def _refuse_shared(first: list[Prompt], first_path, second: list[Prompt], second_path, why: str) -> None:
    count, example = _overlap(first, second)
    if count:
        raise UsageError(f"{first_path}: {count} prompt(s) also in {second_path} (e.g. {example[:60]!r}); {why}")


def load_split(
    harmful: str | Path,
    benign: str | Path,
    *,
    holdout: float | None = None,
    holdout_harmful: str | Path | None = None,
    holdout_benign: str | Path | None = None,
    seed: int = 0,
    limit: int | None = None,
) -> PromptSplit:
    """Read the prompt files and split them (see the module docstring).

    ``holdout`` (default 0.5) splits the files; separate held-out files replace it (giving both
    is refused: the split would silently not happen). ``limit`` caps every part (tuning and
    held-out, per label) at that many prompts, sampled by seed. No prompt may be both harmful
    and benign, and separate held-out files must share no prompt text with the tuning files,
    under either label: the search saw those prompts."""
    separate = holdout_harmful is not None or holdout_benign is not None
    if holdout is not None and separate:
        raise UsageError("--holdout splits the prompt files, --holdout-harmful/--holdout-benign replace that split: "
                         "give one or the other")
    holdout = 0.5 if holdout is None else holdout
    if not 0 < holdout < 1:
        raise UsageError(f"--holdout must be a fraction in (0, 1), got {holdout!r}")
    if (holdout_harmful is None) != (holdout_benign is None):
        raise UsageError("give both --holdout-harmful and --holdout-benign, or neither (then --holdout splits the files)")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    both = "a prompt cannot be both harmful and benign"
    tuning = {"harmful": read_labelled(harmful, "harmful"), "benign": read_labelled(benign, "benign")}
    named = {"harmful": f"--harmful-prompts {harmful}", "benign": f"--benign-prompts {benign}"}
    _refuse_shared(tuning["benign"], named["benign"], tuning["harmful"], named["harmful"], both)
    held_out: dict[str, list[Prompt]] = {}
    if separate:
        held_out = {"harmful": read_labelled(holdout_harmful, "harmful"), "benign": read_labelled(holdout_benign, "benign")}
        held_named = {"harmful": f"--holdout-harmful {holdout_harmful}", "benign": f"--holdout-benign {holdout_benign}"}
        _refuse_shared(held_out["benign"], held_named["benign"], held_out["harmful"], held_named["harmful"], both)
        for label in ("harmful", "benign"):
            for seen in ("harmful", "benign"):
                _refuse_shared(held_out[label], held_named[label], tuning[seen], named[seen],
                               "held-out prompts must be new to the search")
    parts: dict[str, tuple[list[Prompt], list[Prompt]]] = {}
    for label, path in (("harmful", harmful), ("benign", benign)):
        if separate:
            tune, held = tuning[label], held_out[label]
        else:
            tune, held = split(tuning[label], holdout, seed, f"{label}:{Path(path).name}")
        parts[label] = (_limited(tune, limit, seed, f"tune:{label}"), _limited(held, limit, seed, f"held:{label}"))
    return PromptSplit(
        tune_harmful=tuple(parts["harmful"][0]),
        tune_benign=tuple(parts["benign"][0]),
        held_harmful=tuple(parts["harmful"][1]),
        held_benign=tuple(parts["benign"][1]),
    )
