"""Read the user's small input files (indexes, recipes, prompt and demo files, configs) without
trusting them.

Every reader here refuses what would hang or exhaust the machine before reading a byte (a FIFO
or a device such as ``/dev/zero`` instead of a file, a file over a size cap), and turns every way
a parser can fail on hostile content (deep nesting -> ``RecursionError``, ``NaN``/``Infinity``,
lone surrogates such as ``\\ud800`` that cannot be printed or tokenized) into one error naming the
file. Callers pass the :mod:`ckptops.errors` class their command reports.

:func:`same_file` is how a command that writes a single file checks that it never replaces one
of its own inputs.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from ckptops.errors import CkptopsError


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(path: str | os.PathLike, error: type[CkptopsError], what: str = "file") -> int:
    """An ``O_RDONLY`` descriptor of a regular file; anything else refused at once (opening with
    ``O_NONBLOCK`` so that a FIFO with no writer cannot block ``open`` itself)."""
    shown = os.fspath(path)
    if os.path.islink(shown) and not os.path.exists(shown):
        raise error(f"{shown}: is a symbolic link to {os.readlink(shown)!r}, which does not exist")
    try:
        fd = os.open(shown, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{shown}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{shown}: is a folder, not a {what}") from None
    except PermissionError:
        raise error(f"{shown}: permission denied") from None
    except OSError as exc:
        raise error(f"{shown}: cannot open ({exc.strerror or exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{shown}: is {_kind(mode)}, not a regular {what}")
    if hasattr(os, "O_NONBLOCK"):
        os.set_blocking(fd, True)
    return fd


def read_limited(path: str | os.PathLike, limit: int, error: type[CkptopsError], what: str = "file") -> bytes:
    """The whole file, refused (before reading) when it is over ``limit`` bytes."""
    fd = open_regular(path, error, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(f"{os.fspath(path)}: {what} is {size:,} bytes, over the {limit:,}-byte limit")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:  # grew while reading
                raise error(f"{os.fspath(path)}: {what} is over the {limit:,}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: str | os.PathLike, limit: int, error: type[CkptopsError], what: str = "file",
              encoding: str = "utf-8") -> str:
    """:func:`read_limited`, decoded strictly (a bad byte is an error naming its position)."""
    data = read_limited(path, limit, error, what)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise error(f"{os.fspath(path)}: not UTF-8 text (byte {exc.start} of this {what})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def unprintable(value: Any) -> bool:
    """Whether a parsed value holds a string that is not valid Unicode (a lone surrogate)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def loads_json(text: str, where: str, error: type[CkptopsError]) -> Any:
    """Parse JSON text from an untrusted file: every failure is ``error("<where>: ...")``."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except ValueError as exc:
        raise error(f"{where}: not valid JSON ({exc})") from None
    try:
        bad = unprintable(value)
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply") from None
    if bad:
        raise error(f"{where}: holds a lone surrogate escape (\\ud800-\\udfff), not valid Unicode text")
    return value


def load_json_file(path: str | os.PathLike, limit: int, error: type[CkptopsError], what: str = "JSON file") -> Any:
    return loads_json(read_text(path, limit, error, what), os.fspath(path), error)


def check_text(text: str, where: str, error: type[CkptopsError]) -> str:
    """A string that will be printed or tokenized: refuse lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(f"{where}: holds a lone surrogate (character {exc.start}), not valid Unicode text") from None
    return text


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """The same file: equal paths once symlinks are resolved, or one inode (a hard link)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


__all__ = ["open_regular", "read_limited", "read_text", "loads_json", "load_json_file", "check_text",
           "unprintable", "same_file", "Path"]
