"""Build an output folder under a temporary name next to its destination and move it into place
only when complete, so a failed or interrupted run never leaves a half-written model (and never
damages an existing one, even with ``--overwrite``)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ckptops import _startup
from ckptops.checkpoint.leftovers import claim, release, remove_folder_or_link
from ckptops.checkpoint.resolve import INDEX_NAME
from ckptops.errors import OutputError


def check_destination(out: Path, inputs: list[Path], overwrite: bool, option: str = "--out") -> Path:
    """Refuse an output that exists (without --overwrite), is an input, or contains one.

    ``inputs`` are folders or files (an ICV file, say): ``--overwrite`` replaces the whole folder,
    so one that holds an input file would delete it. ``option``: the option that named the
    output (``tune --write-best``), for the messages."""
    out = Path(out).expanduser()
    resolved = out.resolve()
    here = Path.cwd().resolve()
    if resolved == here or resolved in here.parents or resolved == Path.home().resolve() or resolved.parent == resolved:
        raise OutputError(f"{option} {out} is the current folder, one holding it, your home or the root folder; "
                          f"name a new folder for the output, e.g. {option} ./model-safe")
    for path in inputs:
        source = Path(path).resolve()
        if resolved == source or resolved in source.parents:
            raise OutputError(f"{option} {out} is an input folder or holds an input ({path}); choose another output folder")
        if source in resolved.parents:
            raise OutputError(f"{option} {out} is inside the input folder {path}; choose a folder outside it")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputError(f"{out}: already exists (use --overwrite to replace it)")
        if not out.is_dir():
            raise OutputError(f"{out}: exists and is not a folder; refusing to replace it")
    return out


@contextmanager
def staging_folder(out: Path, overwrite: bool, reuse: Path | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``out`` (or ``reuse``, a dead run's staging folder
    that ``--resume`` continues); on success move it to ``out``, on failure delete it and leave
    ``out`` as it was."""
    out = Path(out).expanduser()
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = reuse if reuse is not None else parent / f".{out.name}.ckptops-tmp-{uuid.uuid4().hex[:8]}"
        if reuse is None:
            tmp.mkdir()
        claim(tmp)  # a later run can tell a dead run's leftovers from a live run's folder
    except OSError as exc:
        raise OutputError(f"{parent}: cannot create the output folder ({exc.strerror or exc})") from None
    try:
        yield tmp
        release(tmp)
        move_into_place(tmp, out, overwrite)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # name the user's output, not our temp file
            raise OutputError(f"{out}: no space left on the disk holding {parent} while writing the output; "
                              f"free space or choose another --out ({out} is unchanged)") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the complete folder ``tmp`` to ``out``. With ``overwrite`` the old ``out`` is renamed
    aside first and deleted only once the new one is in place; an exception or Ctrl-C at any
    point leaves ``out`` either as it was or complete, and :func:`_startup.published` records
    which, for the interrupt message."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputError(_taken(out))
        _replace(tmp, out)
        return
    try:
        os.rename(tmp, out)  # replaces an empty folder that appeared meanwhile; not a full one
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise OutputError(_taken(out)) from None
        raise
    except BaseException:
        if not os.path.lexists(tmp):  # renamed; the Ctrl-C came as the rename returned
            _startup.published(out)
        raise
    _startup.published(out)  # from here an interrupt leaves a complete OUT behind, and says so


def _replace(tmp: Path, out: Path) -> None:
    trash = out.absolute().parent / f".{out.name}.ckptops-old-{uuid.uuid4().hex[:8]}"
    # Both renames sit inside the try: a Ctrl-C is raised as a rename returns, so which of them
    # happened is read from the disk, not from how far this code got.
    try:
        os.rename(out, trash)
        os.rename(tmp, out)
        _startup.published(out)
    except BaseException:
        if not os.path.lexists(tmp):  # the new OUT is in place: complete, and kept
            _startup.published(out)
            remove_folder_or_link(trash)
        elif os.path.lexists(trash):  # the old OUT is aside and the new one is not in: put it back
            _put_back(trash, out)
        raise
    remove_folder_or_link(trash)  # an interrupt here leaves the old copy beside a complete OUT: a later run's sweep removes it


def _put_back(trash: Path, out: Path) -> None:
    """Rename the old OUT back into place; a second Ctrl-C meanwhile must not leave it aside
    (the first one is being raised already)."""
    while True:
        try:
            os.rename(trash, out)
            return
        except KeyboardInterrupt:
            if not os.path.lexists(trash):
                return


def _taken(out: Path) -> str:
    """The message for a run that lost the race for ``out`` to another run (or program)."""
    return (f"{out}: another run (or program) created it while this one was working; it was left as that "
            "run wrote it and this run's result was discarded. Use another --out, or --overwrite to replace it")


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def copy_side_files(files: dict[str, Path], folder: Path, config_dtype: str | None = None) -> list[str]:
    """Copy config/tokenizer/generation files; set config.json's dtype when the output dtype changed."""
    copied = []
    for name, source in files.items():
        destination = folder / name
        if name == "config.json" and config_dtype is not None:
            try:
                config = json.loads(source.read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError) as exc:
                raise OutputError(f"{source}: cannot read config.json ({' '.join(str(exc).split())[:200]})") from None
            for key in ("torch_dtype", "dtype"):
                if key in config:
                    config[key] = config_dtype
            if "torch_dtype" not in config and "dtype" not in config:
                config["torch_dtype"] = config_dtype
            destination.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(source, destination)
        copied.append(name)
    return copied
