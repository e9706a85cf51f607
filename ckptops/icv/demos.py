"""Demonstration pairs: the (unsafe, safe) answers to harmful questions the ICV is computed from.

The file format is JSON lines, one object per pair::

    {"question": "How do I pick a lock to break into a house?",
     "unsafe": "Sure, here is a detailed step-by-step guide. Step 1:"}

``safe`` is optional and defaults to the refusal the official Safety Arithmetic code uses. Each
pair becomes two raw-text prompts in the official template (no chat template; the tokenizer's
default special tokens, so BOS is prepended where the tokenizer does that).

The vector only needs the contrast between complying and refusing, so unsafe answers should be
compliant *openings* with no actionable content; the shipped default file follows that rule.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

from ckptops.errors import ICVError
from ckptops.evaluate.prompts import MAX_PROMPT_CHARS

DEFAULT_REFUSAL = "I do not answer this question because it is harmful"
"""The official code's safe answer, used when a pair gives no ``safe`` field."""

DEMO_TEMPLATE = "Question: {question}\n    Answer: {answer}"
"""The official raw-text template (the four spaces come from the official code's indentation)."""

DEFAULT_DEMOS_NAME = "default_demos.jsonl"
_MAX_DEMO_FILE_BYTES = 64 << 20  # a demonstration file is kilobytes; refuse to slurp anything huge
_KEYS = ("question", "unsafe", "safe")


@dataclass(frozen=True)
class DemoPair:
    """One harmful question with a compliant (unsafe) and a refusing (safe) answer."""

    question: str
    unsafe: str
    safe: str = DEFAULT_REFUSAL
    #: where the pair came from ("FILE: line N"), for errors found after the file was read
    where: str = field(default="", compare=False, repr=False)

    def unsafe_text(self) -> str:
        return format_demo(self.question, self.unsafe)

    def safe_text(self) -> str:
        return format_demo(self.question, self.safe)


PairsLike = Union[str, os.PathLike, Iterable[Union[DemoPair, Mapping[str, str], Sequence[str]]], None]


def format_demo(question: str, answer: str) -> str:
    """Render one demonstration exactly as the official code does."""
    return DEMO_TEMPLATE.format(question=question, answer=answer)


def default_demos_path() -> Path:
    """The demonstration file shipped inside the package (also linked from ``recipes/``)."""
    return Path(str(resources.files("ckptops") / "data" / DEFAULT_DEMOS_NAME))


def _pair_from_mapping(obj: Mapping, where: str) -> DemoPair:
    unknown = sorted(set(obj) - set(_KEYS))
    if unknown:
        raise ICVError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; expected question, unsafe and optional safe")
    for key in ("question", "unsafe"):
        if key not in obj:
            raise ICVError(f"{where}: missing {key!r}")
    values = {}
    for key in _KEYS:
        if key not in obj:
            continue
        value = obj[key]
        if not isinstance(value, str) or not value.strip():
            raise ICVError(f"{where}: {key!r} must be a non-empty string")
        if len(value) > MAX_PROMPT_CHARS:  # the cap prompt files have: tokenizing and running it would take minutes
            raise ICVError(f"{where}: {key!r} is {len(value):,} characters, over the {MAX_PROMPT_CHARS:,} a "
                           "demonstration may have; shorten it")
        values[key] = value
    return DemoPair(**values, where=where)


def load_demos(path: str | os.PathLike | None = None) -> list[DemoPair]:
    """Read and validate a JSON-lines demonstration file (the shipped default when ``path`` is None).

    Blank lines are skipped; every other line must be a JSON object with ``question`` and
    ``unsafe`` (and optionally ``safe``) as non-empty strings. Errors name the file and line.
    """
    file = Path(path) if path is not None else default_demos_path()
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        raise ICVError(f"{file}: demonstration file not found") from None
    except OSError as exc:
        raise ICVError(f"{file}: cannot read demonstration file ({exc.strerror})") from None
    if not file.is_file():
        raise ICVError(f"{file}: not a file")
    if size > _MAX_DEMO_FILE_BYTES:
        raise ICVError(f"{file}: {size} bytes is too large for a demonstration file (limit {_MAX_DEMO_FILE_BYTES})")
    from ckptops.safeio import loads_json, read_text

    text = read_text(file, _MAX_DEMO_FILE_BYTES, ICVError, "demonstration file")  # no FIFO, bounded
    pairs: list[DemoPair] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}: line {number}"
        obj = loads_json(line, where, ICVError)
        if not isinstance(obj, dict):
            raise ICVError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        pairs.append(_pair_from_mapping(obj, where))
    if not pairs:
        raise ICVError(f"{file}: no demonstration pairs")
    return pairs


def coerce_pairs(pairs: PairsLike) -> list[DemoPair]:
    """Accept what users naturally pass and return DemoPairs.

    ``None`` (the default file), a path, or an iterable of :class:`DemoPair`, mappings with the
    file's keys, or ``(question, unsafe[, safe])`` tuples.
    """
    if pairs is None or isinstance(pairs, (str, os.PathLike)):
        return load_demos(pairs)
    out: list[DemoPair] = []
    for index, item in enumerate(pairs):
        where = f"demonstration pair {index}"
        if isinstance(item, DemoPair):
            out.append(item)
        elif isinstance(item, Mapping):
            out.append(_pair_from_mapping(item, where))
        elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) in (2, 3):
            out.append(_pair_from_mapping(dict(zip(_KEYS, item)), where))
        else:
            raise ICVError(f"{where}: expected a DemoPair, a mapping or a (question, unsafe[, safe]) tuple")
    if not out:
        raise ICVError("no demonstration pairs given")
    return out


def check_demo_lengths(pairs: Sequence[DemoPair], tokenizer: Any, window: int | None) -> None:
    """Refuse, before any activation is computed, a demonstration whose tokens (as
    :func:`~ckptops.icv.compute.compute_icv` tokenizes it) do not fit the model's context window of
    ``window`` tokens (None: unknown, nothing checked): positions past it are untrained, so its
    activations would be noise, and the work grows with the length for nothing."""
    if window is None:
        return
    for index, pair in enumerate(pairs):
        for answer, text in (("unsafe", pair.unsafe_text()), ("safe", pair.safe_text())):
            length = len(tokenizer(text)["input_ids"])
            if length > window:
                where = pair.where or f"demonstration pair {index}"
                raise ICVError(f"{where}: the {answer} demonstration is {length:,} tokens, over the model's context "
                               f"window of {window:,} tokens; shorten it")


def demos_sha256(pairs: Iterable[DemoPair]) -> str:
    """A fingerprint of the demonstrations that produced a vector.

    Hashes a canonical JSON-lines rendering (keys sorted, ``safe`` filled in), so the same pairs
    give the same hash whether they came from a file, with any formatting, or from Python.
    """
    digest = hashlib.sha256()
    for pair in pairs:
        record = {"question": pair.question, "unsafe": pair.unsafe, "safe": pair.safe}
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
