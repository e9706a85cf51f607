"""Where ``ckptops eval --out`` may write its JSON report, checked before any generation.

``--out`` is typed by hand next to paths the command reads, so a slip (``--out prompts.jsonl``,
``--out model/config.json``) would silently replace an input with the report. An input file and
anything inside a model folder are therefore refused, even with ``--overwrite``. An existing
file is replaced only when it is an earlier eval report (rerunning the same command, as the
SmolLM2 example's ``--force`` does) or with ``--overwrite``: anything else may be the user's data.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from ckptops.errors import OutputError
from ckptops.safeio import same_file

#: how every report :func:`ckptops.evaluate.report.write_json` writes begins (``format`` is its
#: first key): ``ckptops.eval/N`` or ``ckptops.eval.compare/N``
_REPORT_START = re.compile(rb'\A\s*\{\s*"format"\s*:\s*"ckptops\.eval(\.compare)?/[0-9]+"')
#: enough of the file to see that start; a report is never recognised by parsing it whole (the
#: path may name a multi-gigabyte weight file)
_HEAD_BYTES = 4096


def is_eval_report(path: str | os.PathLike) -> bool:
    """True when ``path`` is a regular file that begins like a ckptops eval report."""
    path = Path(path)
    if not path.is_file():  # a FIFO or device is never read: it could block or never end
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEAD_BYTES)
    except OSError:
        return False
    return _REPORT_START.match(head) is not None


def check_report_destination(out: str | os.PathLike, *, input_files: Iterable[tuple[str, str | os.PathLike | None]],
                             model_folders: Iterable[str | os.PathLike], overwrite: bool) -> Path:
    """Refuse an ``out`` that is an input file (``(option, path)`` pairs), lies inside a model
    folder, or exists without being an earlier eval report (unless ``overwrite``)."""
    out = Path(out)
    resolved = out.resolve()
    for option, path in input_files:
        if path is not None and same_file(out, path):
            raise OutputError(f"--out {out} is the {option} file {path}: the report would replace it; "
                              "write the report to another file")
    for folder in model_folders:
        folder_path = Path(folder)
        if folder_path.is_dir() and folder_path.resolve() in (resolved, *resolved.parents):
            raise OutputError(f"--out {out} is inside the model folder {folder}: the report would change the model; "
                              "write the report outside it")
    if out.is_dir():
        raise OutputError(f"--out {out}: is a folder, expected a file name such as report.json")
    existing = next(p for p in out.absolute().parents if p.exists())  # missing folders are created
    if not existing.is_dir():
        raise OutputError(f"--out {out}: {existing} is not a folder")
    if (out.exists() or out.is_symlink()) and not overwrite and not is_eval_report(out):
        raise OutputError(f"{out}: already exists and is not a ckptops eval report (use --overwrite to replace it)")
    return out
