"""Prompt sets: read JSON lines or CSV files into labelled prompts.

A safety evaluation needs to know, for every prompt, whether refusing it is the right answer
(``harmful``) or an over-refusal (``benign``). The label comes either from the command line, one
per file (``--label harmful``), or from a ``label`` column in the file itself, as in XSTest where
``unsafe`` means harmful and ``safe`` means benign.

Accepted files:

- **JSON lines** (``.jsonl``, ``.ndjson``, or ``.json``): one object per line, with a prompt
  field and, optionally, a ``label`` field. A ``.json`` file may instead hold one JSON array of
  such objects (rows are then numbered by their position in the array).
- **CSV** (``.csv``; ``.tsv`` with tabs): a header row with a prompt column and, optionally, a
  ``label`` column.

The prompt field is the first of :data:`PROMPT_FIELDS` present (``prompt`` first; ``goal`` is
AdvBench's CSV column), unless ``prompt_field`` names another. Every other field is kept as
metadata (XSTest's ``type`` and ``id`` end up in the JSON report). Files are read whole: prompt
sets are small (XSTest is 450 rows); a file over :data:`MAX_PROMPT_FILE_BYTES` is refused.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

from ckptops.evaluate._errors import EvalError

Label = Literal["harmful", "benign"]

#: Column / field names tried, in order, when the caller does not name the prompt field.
PROMPT_FIELDS: tuple[str, ...] = ("prompt", "goal", "instruction", "question", "query", "text")

#: Label spellings accepted in a file's ``label`` column or on the command line.
LABEL_ALIASES: dict[str, Label] = {
    "harmful": "harmful",
    "unsafe": "harmful",
    "benign": "benign",
    "safe": "benign",
    "harmless": "benign",
}

#: ``--label auto``: take each row's label from the file's ``label`` column.
AUTO_LABEL = "auto"

MAX_PROMPT_FILE_BYTES = 32 * 1024 * 1024
#: a prompt longer than this many characters is refused when the file is read: tokenizing and
#: generating from it would take minutes, and no evaluation prompt is that long (the model's
#: context window is checked again, in tokens, before generation)
MAX_PROMPT_CHARS = 100_000

_JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
_CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}


@dataclass(frozen=True)
class Prompt:
    """One prompt to send to the model, with the answer the evaluation expects."""

    text: str
    label: Label
    set_name: str
    row: int  # 1-based line in the file (CSV: the line where the row ends; JSON array: the item)
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class PromptSet:
    """All prompts of one file; ``name`` identifies the set in tables and reports."""

    name: str
    path: str
    prompts: tuple[Prompt, ...]

    @property
    def labels(self) -> list[Label]:
        """The labels present in this set, harmful first."""
        present = {p.label for p in self.prompts}
        return [label for label in ("harmful", "benign") if label in present]

    def __len__(self) -> int:
        return len(self.prompts)


def parse_label(value: str, *, where: str) -> Label:
    """Map a label spelling (``unsafe``, ``Safe``, ``harmful`` ...) to ``harmful`` / ``benign``."""
    label = LABEL_ALIASES.get(str(value).strip().lower())
    if label is None:
        accepted = ", ".join(sorted(LABEL_ALIASES))
        raise EvalError(f"{where}: unknown label {value!r} (accepted: {accepted})")
    return label


def load_prompt_set(
    path: str | Path,
    *,
    label: str | None = None,
    prompt_field: str | None = None,
    name: str | None = None,
    limit: int | None = None,
) -> PromptSet:
    """Read one prompt file.

    Args:
        path: a ``.jsonl`` / ``.json`` (one object per line, or a ``.json`` array), ``.csv`` or
            ``.tsv`` file.
        label: ``harmful`` or ``benign`` (or ``unsafe`` / ``safe``) for every row; ``None`` or
            ``"auto"`` reads each row's ``label`` field instead.
        prompt_field: the column holding the prompt; by default the first of
            :data:`PROMPT_FIELDS` that the file has.
        name: the set's name in reports; the file name without its suffix by default.
        limit: keep only the first ``limit`` prompts (quick runs).

    Raises:
        EvalError: the file is missing, empty, not valid JSON lines / CSV, has no prompt
            column, an empty prompt, or a row without a usable label. The message names the
            file and the line.

    Example::

        >>> adv = load_prompt_set("advbench_heldout.jsonl", label="harmful")
        >>> xs = load_prompt_set("xstest_prompts.csv")          # label column: safe / unsafe
    """
    from ckptops.safeio import read_text

    path = Path(path)
    shown = str(path)
    if limit is not None and limit < 1:
        raise EvalError(f"{shown}: limit must be at least 1, got {limit}")
    fixed_label: Label | None = None
    if label is not None and str(label).lower() != AUTO_LABEL:
        fixed_label = parse_label(label, where=f"{shown}: --label")
    # a regular file (no FIFO, no /dev/zero) of bounded size, strict UTF-8
    text = read_text(path, MAX_PROMPT_FILE_BYTES, EvalError, "prompt file", encoding="utf-8-sig")
    if not text.strip():
        raise EvalError(f"{shown}: prompt file is empty")

    suffix = path.suffix.lower()
    if suffix == ".json" and text.lstrip().startswith("["):
        rows = list(_read_json_array(text, shown))
    elif suffix in _JSONL_SUFFIXES:
        rows = list(_read_jsonl(text, shown))
    elif suffix in _CSV_SUFFIXES:
        rows = list(_read_csv(text, shown, delimiter=_CSV_SUFFIXES[suffix]))
    else:
        raise EvalError(f"{shown}: unknown prompt file type {suffix or '(none)'!r}; use .jsonl, .json, .csv or .tsv")
    if not rows:
        raise EvalError(f"{shown}: no prompts in file")

    set_name = name or path.stem
    keys = _all_keys(row for _, row in rows)
    field_name = _choose_prompt_field(keys, prompt_field, shown)
    prompts: list[Prompt] = []
    for line, row in rows:
        where = f"{shown}:{line}"
        value = row.get(field_name)
        if not isinstance(value, str):
            shown_value = "missing" if value is None else f"not text ({type(value).__name__})"
            raise EvalError(f"{where}: prompt field {field_name!r} is {shown_value}")
        if not value.strip():
            raise EvalError(f"{where}: prompt field {field_name!r} is empty")
        if len(value) > MAX_PROMPT_CHARS:
            raise EvalError(f"{where}: prompt is {len(value):,} characters, over the {MAX_PROMPT_CHARS:,} "
                            "ckptops evaluates; shorten it")
        check_text(value, f"{where}: prompt", EvalError)
        if fixed_label is not None:
            row_label = fixed_label
        else:
            raw = row.get("label")
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                raise EvalError(
                    f"{where}: no label; add a 'label' column (harmful/benign or unsafe/safe) "
                    "or pass --label harmful|benign for this file"
                )
            row_label = parse_label(raw, where=f"{where}: label")
        meta = {k: v for k, v in row.items() if k not in (field_name,)}
        prompts.append(Prompt(text=value, label=row_label, set_name=set_name, row=line, meta=meta))
        if limit is not None and len(prompts) >= limit:
            break
    return PromptSet(name=set_name, path=shown, prompts=tuple(prompts))


def load_prompt_sets(paths: Sequence[str | Path], labels: Sequence[str] = (), **kwargs) -> list[PromptSet]:
    """Read several prompt files, pairing ``labels`` with ``paths`` as the CLI does.

    No label: every file needs a ``label`` column. One label: it applies to every file. As many
    labels as files: paired in order, ``auto`` meaning "this file's label column". Set names are
    made unique (``name``, ``name-2``) so that two files with the same stem stay apart.
    """
    if not paths:
        raise EvalError("no prompt files given (use --prompts FILE)")
    if len(labels) == 0:
        per_file: list[str | None] = [None] * len(paths)
    elif len(labels) == 1:
        per_file = [labels[0]] * len(paths)
    elif len(labels) == len(paths):
        per_file = list(labels)
    else:
        raise EvalError(
            f"{len(labels)} --label values for {len(paths)} --prompts files; give one label for all, "
            "or one per file in the same order (use 'auto' for a file with a label column)"
        )
    sets: list[PromptSet] = []
    seen: dict[str, int] = {}
    for path, label in zip(paths, per_file):
        stem = Path(path).stem
        seen[stem] = seen.get(stem, 0) + 1
        name = stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"
        sets.append(load_prompt_set(path, label=label, name=name, **kwargs))
    return sets


from ckptops.safeio import check_text, loads_json  # noqa: E402


def _read_json_array(text: str, shown: str) -> Iterable[tuple[int, dict]]:
    rows = loads_json(text, shown, EvalError)
    if not isinstance(rows, list):
        raise EvalError(f"{shown}: expected a JSON array of objects, got {type(rows).__name__}")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise EvalError(f"{shown}: item {number}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def _read_jsonl(text: str, shown: str) -> Iterable[tuple[int, dict]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row = loads_json(line, f"{shown}:{number}", EvalError)
        if not isinstance(row, dict):
            raise EvalError(f"{shown}:{number}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def _read_csv(text: str, shown: str, *, delimiter: str) -> Iterable[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = reader.fieldnames
        if not header or all(not (h or "").strip() for h in header):
            raise EvalError(f"{shown}: CSV file has no header row")
        for row in reader:
            if None in row:
                raise EvalError(f"{shown}:{reader.line_num}: more fields than the header has ({len(header)})")
            if all(v is None or not str(v).strip() for v in row.values()):
                continue
            cleaned = {(k or "").strip(): v for k, v in row.items()}
            yield reader.line_num, cleaned  # the file line where this row ends
    except csv.Error as exc:
        raise EvalError(f"{shown}:{reader.line_num}: malformed CSV: {exc}") from None


def _all_keys(rows: Iterable[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for row in rows:
        for key in row:
            keys.setdefault(key, None)
    return list(keys)


def _choose_prompt_field(keys: list[str], wanted: str | None, shown: str) -> str:
    if wanted is not None:
        if wanted not in keys:
            raise EvalError(f"{shown}: no column {wanted!r} (columns: {', '.join(keys) or 'none'})")
        return wanted
    for candidate in PROMPT_FIELDS:
        if candidate in keys:
            return candidate
    raise EvalError(
        f"{shown}: no prompt column; expected one of {', '.join(PROMPT_FIELDS)} "
        f"(columns: {', '.join(keys) or 'none'})"
    )
