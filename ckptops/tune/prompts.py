"""The prompts ``tune`` searches on and the held-out prompts it reports on.

A search that reports the figures it optimised overstates them (the best of nine noisy
measurements is optimistic). So each prompt file is split, by a seeded shuffle, into a tuning
part and a held-out part that the search never sees; or the held-out prompts come from separate
files. Prompts are de-duplicated by text first, so that no prompt can sit on both sides.

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


def load_split(
    harmful: str | Path,
    benign: str | Path,
    *,
    holdout: float = 0.5,
    holdout_harmful: str | Path | None = None,
    holdout_benign: str | Path | None = None,
    seed: int = 0,
    limit: int | None = None,
) -> PromptSplit:
    """Read the prompt files and split them (see the module docstring).

    ``limit`` caps every part (tuning and held-out, per label) at that many prompts, sampled
    by seed. Separate held-out files must share no prompt text with the tuning files."""
    if not 0 < holdout < 1:
        raise UsageError(f"--holdout must be a fraction in (0, 1), got {holdout!r}")
    if (holdout_harmful is None) != (holdout_benign is None):
        raise UsageError("give both --holdout-harmful and --holdout-benign, or neither (then --holdout splits the files)")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    parts: dict[str, tuple[list[Prompt], list[Prompt]]] = {}
    for label, path, held_path in (("harmful", harmful, holdout_harmful), ("benign", benign, holdout_benign)):
        prompts = read_labelled(path, label)
        if held_path is None:
            tune, held = split(prompts, holdout, seed, f"{label}:{Path(path).name}")
        else:
            tune, held = prompts, read_labelled(held_path, label)
            shared = {p.text.strip() for p in tune} & {p.text.strip() for p in held}
            if shared:
                example = sorted(shared)[0]
                raise UsageError(f"{held_path}: {len(shared)} prompt(s) also in {path} (e.g. {example[:60]!r}); "
                                 "held-out prompts must be new to the search")
        parts[label] = (_limited(tune, limit, seed, f"tune:{label}"), _limited(held, limit, seed, f"held:{label}"))
    return PromptSplit(
        tune_harmful=tuple(parts["harmful"][0]),
        tune_benign=tuple(parts["benign"][0]),
        held_harmful=tuple(parts["harmful"][1]),
        held_benign=tuple(parts["benign"][1]),
    )
