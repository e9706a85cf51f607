"""Where ``ckptops icv compute --out`` may write its ICV file, checked before the model loads.

Writing the ICV into the model folder is a documented use (``--out MODEL/icv.safetensors``:
``generate`` and ``from_pretrained`` then apply it), so the folder itself is not refused. But
``--out`` is typed next to paths the command reads, and a slip such as ``--out MODEL/config.json``
or ``--out MODEL/model-00001-of-00002.safetensors`` with ``--overwrite`` used to replace that file
and break the model. Inside the model folder an existing file is therefore replaced only when it
is an earlier ICV file, even with ``--overwrite``; and the ``--demos`` file is never replaced.
"""

from __future__ import annotations

import os
from pathlib import Path

from ckptops.errors import OutputError
from ckptops.icv.file import ICV_FILENAME, is_icv_file
from ckptops.safeio import same_file


def check_icv_destination(out: str | os.PathLike, *, model: str | os.PathLike, demos: str | os.PathLike | None,
                          overwrite: bool) -> Path:
    """Refuse an ``out`` that is the ``demos`` file, that would replace a file of the local model
    folder ``model`` other than an ICV file, or that exists without ``overwrite``."""
    out = Path(out)
    if demos is not None and same_file(out, demos):
        raise OutputError(f"--out {out} is the --demos file {demos}: the ICV would replace it; "
                          "write the ICV to another file")
    folder = Path(model)
    # the directory entry the atomic rename replaces: a link there is replaced itself, not followed,
    # so an HF-cache snapshot's config.json (a link into blobs/) counts as inside the folder
    entry = out.absolute().parent.resolve() / out.name
    exists = out.exists() or out.is_symlink()
    inside = folder.is_dir() and folder.resolve() in entry.parents
    if exists and inside and not is_icv_file(out):
        raise OutputError(f"--out {out} is a file of the model folder {model} and not an ICV file: the ICV would "
                          f"replace it and damage the model; write to a new name such as "
                          f"{folder / ICV_FILENAME} or outside the folder")
    if inside and out.name.endswith(".safetensors") and out.name != ICV_FILENAME:
        # the folder's loaders skip only icv.safetensors: under another name the ICV would be
        # read as one more weight file of the model
        raise OutputError(f"--out {out}: inside the model folder {model} the ICV file must be named "
                          f"{ICV_FILENAME} (other .safetensors files there are read as the model's weights)")
    if exists and not overwrite:
        raise OutputError(f"{out}: already exists (use --overwrite to replace it)")
    return out
