"""Which small files of an input model folder (config, tokenizer, ...) go into an output folder,
and the checks on them made before any work.

Why: ``sanitize``, ``run`` and ``icv bake`` copy these files verbatim into their output, which
``--push-to-hub`` then publishes. A model folder received from someone else may hold a symbolic
link such as ``notes.txt -> ~/.ssh/id_rsa``; following it would copy that file into the output.
So a side file that is a symbolic link whose target lies outside the model folder is never
copied: a stray file is skipped with a warning, and a file the output needs to load (its config,
its tokenizer) is refused, since an output without it would not load as the input did.

Two exceptions keep the Hugging Face cache working: every file of a cache snapshot
(``.../models--ORG--NAME/snapshots/REV/``) is a link into ``.../models--ORG--NAME/blobs/``, so
targets anywhere inside the same ``models--*`` repo folder count as inside; and a link to a blob
of any cache repo (``models--*/blobs/<hash>``, as ``huggingface-cli download --local-dir``
made them) counts as inside too.

Weight shards reached through symbolic links are read as before (users link big shards, and the
cache relies on it): they are read, never copied verbatim, and their headers are validated.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ckptops.errors import CheckpointError

#: the files transformers reads to load the model and its tokenizer: a link out of the folder
#: for one of these is refused, not skipped (the output would not load, or load differently)
NEEDED = frozenset({
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
})
#: a config.json is a few KB; the cap only guards against a huge or endless file
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def allowed_area(root: Path) -> Path:
    """The folder a side file's link may lead into: the model folder itself, or for a Hugging Face
    cache snapshot (or a folder inside one), its ``models--ORG--NAME`` repo folder."""
    real = root.resolve()
    for parent in real.parents:
        if parent.name.startswith("models--") and real.relative_to(parent).parts[0] == "snapshots":
            return parent
    return real


def outside_link(entry: Path, area: Path) -> str | None:
    """Where ``entry`` finally leads when it is a symbolic link out of ``area``, else None. A link
    to a blob of a Hugging Face cache counts as inside: a folder made by ``huggingface-cli download
    --local-dir`` (older huggingface_hub) links its large files (a 9 MB tokenizer.json) to
    ``~/.cache/huggingface/hub/models--ORG--NAME/blobs/<hash>``, content the Hub served."""
    if not entry.is_symlink():
        return None
    target = Path(os.path.realpath(entry))
    return None if target.is_relative_to(area) or is_cache_blob(target) else str(target)


def is_cache_blob(path: Path) -> bool:
    """``path`` is a file in the ``blobs/`` folder of a Hugging Face cache repo folder."""
    return path.parent.name == "blobs" and path.parent.parent.name.startswith("models--") and path.is_file()


def _candidates(root: Path):
    from ckptops.checkpoint.resolve import is_side_file

    for entry in sorted(root.iterdir()):
        if entry.is_file() and is_side_file(entry.name, entry.stat().st_size):
            yield entry


def collect_side_files(root: Path) -> dict[str, Path]:
    """The side files to copy into an output folder (see :func:`~ckptops.checkpoint.resolve.is_side_file`),
    without those that link out of the folder. :func:`check_side_files` has warned about those
    (or refused) before the work."""
    area = allowed_area(root)
    return {entry.name: entry for entry in _candidates(root) if outside_link(entry, area) is None}


def check_side_files(checkpoint, *, config: bool = True) -> None:
    """Before any work, for a command whose output holds ``checkpoint``'s side files.

    A side file linking out of the folder: refused when it is one of :data:`NEEDED`, else a
    warning that it is left out. With ``config`` (the output copies config.json as it is): a
    config.json that is not a JSON object is refused, and a missing one is a warning (the output
    then has none either, so transformers cannot load it as is)."""
    if checkpoint.root is None:  # a Hub repo: its files come from the Hub, never through local links
        if config:
            _check_hub_config(checkpoint)
        return
    root = Path(checkpoint.root)
    area = allowed_area(root)
    for entry in _candidates(root):
        target = outside_link(entry, area)
        if target is None:
            continue
        if entry.name in NEEDED:
            raise CheckpointError(f"{entry}: is a symbolic link to {target}, outside the model folder; the output "
                                  "needs this file but ckptops copies nothing from outside the folder (copy the "
                                  "file into the folder in place of the link)")
        warnings.warn(f"{entry}: is a symbolic link to {target}, outside the model folder; it is not copied "
                      "into the output", stacklevel=2)
    if config:
        _check_config(root / "config.json", str(root))


def _check_config(path: Path, where: str) -> None:
    from ckptops.safeio import load_json_file

    if not path.exists() and not path.is_symlink():
        warnings.warn(f"{where}: has no config.json, so the output will have none either and transformers' "
                      "from_pretrained cannot load it as is", stacklevel=3)
        return
    value = load_json_file(path, MAX_CONFIG_BYTES, CheckpointError, "config.json")
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: is not a JSON object (the output's copy would not load)")


def _check_hub_config(checkpoint) -> None:
    """A Hub target: its file list says whether it has a config.json; that one file is fetched
    now (it is small, and fetched at the end anyway) to check it before the work."""
    names = getattr(checkpoint, "side_names", None)
    if names is None:
        return
    if "config.json" not in names:
        warnings.warn(f"{checkpoint.ref}: has no config.json, so the output will have none either and "
                      "transformers' from_pretrained cannot load it as is", stacklevel=3)
        return
    from ckptops.safeio import load_json_file

    path = checkpoint.side_file("config.json")
    value = load_json_file(path, MAX_CONFIG_BYTES, CheckpointError, "config.json")
    if not isinstance(value, dict):
        raise CheckpointError(f"{checkpoint.where('config.json')}: is not a JSON object (the output's copy "
                              "would not load)")
