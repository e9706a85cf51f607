"""Ctrl-C while the command line starts (imports take a second with torch): one line, exit 130.

Until the CLI's click group runs, a SIGINT would surface as a KeyboardInterrupt traceback from
whatever module was importing. :func:`guard` installs a handler that prints the CLI's interrupt
line and leaves at once; :func:`release` restores Python's default once the CLI can handle the
interrupt itself. Only the ``ckptops`` executable and ``python -m ckptops...`` install it: a
library user's signal handlers are never touched.
"""

from __future__ import annotations

import os
import signal
import sys

_guarding = False


def _is_cli() -> bool:
    """The ``ckptops`` executable, or ``python -m ckptops.cli`` (never a library user, a test
    runner, or another ``python -m ckptops.<module>``)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "ckptops" or argv0.endswith(os.path.join("ckptops", "cli.py")):
        return True
    original = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and b in ("ckptops.cli", "ckptops") for a, b in zip(original, original[1:]))


def output_named(argv: list[str]) -> str | None:
    """The ``--out`` value on a command line, if any (for the interrupt message)."""
    for i, arg in enumerate(argv):
        if arg == "--out" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--out="):
            return arg[len("--out="):]
    return None


_published: set[str] = set()


def published(path) -> None:
    """Record that an output was just moved into place, complete (a Ctrl-C after that point
    must not claim that OUT is unchanged). Touches no signal handler: safe for library users."""
    _published.add(os.path.abspath(os.fspath(path)))


def forget_published() -> None:
    """A new command starts: outputs an earlier command of this process published are not its own."""
    _published.clear()


def interrupted_message(argv: list[str] | None = None) -> str:
    """``error: interrupted; OUT unchanged``: every output is built under a temporary name and
    moved into place only when complete, so an interrupt never changes OUT -- unless it came
    after OUT was moved into place (the summary still printing): then OUT is complete and kept."""
    out = output_named(sys.argv[1:] if argv is None else argv)
    if out and os.path.abspath(out) in _published:
        return f"error: interrupted after {out} was written complete; it is kept"
    return f"error: interrupted; {out} unchanged" if out else "error: interrupted; nothing was written"


def _interrupted(signum, frame) -> None:  # pragma: no cover - timing dependent, tested via CLI
    try:
        os.write(2, (interrupted_message() + "\n").encode("utf-8", "replace"))
    finally:
        os._exit(130)


def guard() -> None:
    """Install the start-up handler (CLI processes only, main thread only)."""
    global _guarding
    if _guarding or not _is_cli():
        return
    try:
        signal.signal(signal.SIGINT, _interrupted)
        _guarding = True
    except ValueError:  # not the main thread
        pass


def release() -> None:
    """Imports done: Ctrl-C raises KeyboardInterrupt again (the CLI turns it into the same line)."""
    global _guarding
    if _guarding:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _guarding = False
