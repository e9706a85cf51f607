"""What ``tune`` reads, identified by content, and checked before any model loads.

``OUT/trials.jsonl`` is reused by a rerun with the same settings; a path says nothing about what
is behind it now. So the log records every input by content: each checkpoint by the identity
``sanitize`` records (:func:`ckptops.hdr.sanitize.input_identity`: a local folder's sampled
fingerprint -- shard names, sizes, headers and 16 windows of data --, a Hub repo's commit, an
adapter's sha256), the small text files (``--ppl``, ``--icv-demos``) by their sha256. The prompts
are recorded by their texts already. The same header-only opening serves the checks that
``sanitize`` makes before its work (``--exclude`` matching nothing or everything) and the
``--write-best`` destination.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ckptops.errors import UsageError


def _without_refs(identity: Any) -> Any:
    """The identity without the references as typed (``demo/base`` and ``./demo/base`` are the
    same input: the resolved path and the content say so)."""
    if isinstance(identity, dict):
        return {k: _without_refs(v) for k, v in identity.items() if k != "ref"}
    return identity


def open_models(base: str | os.PathLike, harmful: str | os.PathLike, target: str | os.PathLike, *,
                scope: str, exclude: Sequence[str]) -> tuple[dict[str, dict], list[Path]]:
    """Open the three checkpoints (headers only), plan HDR over them as the session will, warn
    as ``sanitize`` does about ``--exclude``; return each model's identity by role and the
    folders they live in (no output may go there)."""
    from ckptops.checkpoint.lora import open_inputs, split_base_plus_adapter
    from ckptops.hdr.checks import warn_if_nothing_takes_part, warn_unmatched_excludes
    from ckptops.hdr.plan import make_plan
    from ckptops.hdr.sanitize import input_identity

    opened = open_inputs(base, harmful, target)
    plan = make_plan(opened.tau_base, opened.harmful, opened.target, scope=scope, exclude=list(exclude))
    warn_unmatched_excludes(exclude, opened.target)
    warn_if_nothing_takes_part(plan, "every candidate equals the target")
    roles = (("base", opened.base), ("harmful", opened.harmful), ("target", opened.target))
    identities = {role: _without_refs(input_identity(checkpoint)) for role, checkpoint in roles}
    for role, checkpoint in roles:  # what the weights' fingerprint does not cover: config, tokenizer, template
        if checkpoint.root is not None:
            identities[role]["loading_files"] = loading_files_identity(Path(checkpoint.root))
    parts = split_base_plus_adapter(os.fspath(target)) or (target,)  # BASE+ADAPTER: the adapter's folder too
    roots = [checkpoint.root for _, checkpoint in roles if checkpoint.root is not None]
    roots += [Path(ref) for ref in (base, harmful, *parts) if Path(ref).exists()]
    return identities, roots


def loading_files_identity(root: Path) -> dict[str, str]:
    """The sha256 of each file transformers reads besides the weights (config, generation config,
    tokenizer, chat template) in a local folder: a new chat template changes every answer while
    the weights stay the same."""
    from ckptops.checkpoint.resolve import full_sha256
    from ckptops.checkpoint.side_files import NEEDED

    return {name: full_sha256(root / name) for name in sorted(NEEDED) if (root / name).is_file()}


def file_identity(path: str | os.PathLike | None) -> dict | None:
    """A small input file (``--ppl``, ``--icv-demos``): its resolved path and the sha256 of its bytes."""
    if path is None:
        return None
    from ckptops.checkpoint.resolve import full_sha256

    return {"path": str(Path(path).resolve()), "sha256": full_sha256(Path(path))}


def check_write_best(write_best: str | os.PathLike, out: Path, roots: list[Path]) -> None:
    """``--write-best`` is written after the whole search: refuse now what would fail then -- a
    folder that exists, the report folder or a place inside it (or around it), an input folder."""
    from ckptops.checkpoint.publish import check_destination

    destination = Path(write_best).expanduser()
    if destination.exists() or destination.is_symlink():
        raise UsageError(f"--write-best {write_best}: already exists; choose a new folder")
    model, report = destination.resolve(), Path(out).expanduser().resolve()
    if model == report or report in model.parents:
        raise UsageError(f"--write-best {write_best} is --out {out} or inside it (the report folder); "
                         "choose a folder outside it")
    if model in report.parents:
        raise UsageError(f"--out {out} is inside --write-best {write_best}, which must be a new folder at the end; "
                         "choose separate folders")
    check_destination(destination, roots, overwrite=True, option="--write-best")  # (existence refused above)
