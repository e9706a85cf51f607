"""Ctrl-C while the command line starts (imports take a second with torch): one line, exit 130.

Until the CLI's click group runs, a SIGINT would surface as a KeyboardInterrupt traceback from
whatever module was importing. :func:`guard` installs a handler that prints the CLI's interrupt
line and leaves at once; :func:`release` makes Ctrl-C a KeyboardInterrupt once the CLI can handle
the interrupt itself, and :func:`finish` ignores it once the command's last line is out. Only the
``ckptops`` executable and ``python -m ckptops...`` install them: a library user's signal
handlers are never touched.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable  # (not typing: this runs before the guard, on every start)

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
#: folders a rerun continues (``tune``'s report folder), with what an interrupt leaves in them
_notes: dict[str, Callable[[], str]] = {}


def published(path) -> None:
    """Record that an output was just moved into place, complete (a Ctrl-C after that point
    must not claim that OUT is unchanged). Touches no signal handler: safe for library users."""
    _published.add(os.path.abspath(os.fspath(path)))


def interrupt_note(path, note: Callable[[], str]) -> None:
    """Record that ``path`` is a folder the command changes as it goes, by design, and that a
    rerun continues (``tune`` appends each trial to OUT/trials.jsonl): an interrupt must not claim
    that it is unchanged, but say what it holds, ``note()`` (asked when the interrupt comes).
    Touches no signal handler: safe for library users."""
    _notes[os.path.abspath(os.fspath(path))] = note


def forget_published() -> None:
    """A new command starts: outputs an earlier command of this process published are not its own."""
    _published.clear()
    _notes.clear()


def interrupted_message(argv: list[str] | None = None) -> str:
    """``error: interrupted; OUT unchanged``: every output is built under a temporary name and
    moved into place only when complete, so an interrupt never changes OUT -- unless it came
    after OUT was moved into place (the summary still printing): then OUT is complete and kept;
    or OUT is a folder a rerun continues (:func:`interrupt_note`): then the message says what it holds."""
    out = output_named(sys.argv[1:] if argv is None else argv)
    if out and os.path.abspath(out) in _published:
        return f"error: interrupted after {out} was written complete; it is kept"
    if out and os.path.abspath(out) in _notes:
        return f"error: interrupted; {out} {_notes[os.path.abspath(out)]()}"
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


#: between :func:`release` and :func:`finish`: this CLI process turns Ctrl-C into KeyboardInterrupt
_raising = False
#: a Ctrl-C came during the command (see :func:`raise_if_interrupted`)
_interrupt_seen = False


def _raise_interrupt(signum, frame) -> None:
    global _interrupt_seen
    _interrupt_seen = True
    raise KeyboardInterrupt


def _drop_recorded_interrupts(previous):
    """An unraisable-exception hook that keeps quiet about a KeyboardInterrupt Python could not
    raise (it landed in a weakref callback or a ``__del__``): :func:`raise_if_interrupted`
    reports it as the one interrupt line instead of a traceback."""
    def hook(unraisable) -> None:
        if _interrupt_seen and unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            return
        previous(unraisable)
    return hook


def release() -> None:
    """Imports done: Ctrl-C raises KeyboardInterrupt again (the CLI turns it into the same line).

    The handler also records the interrupt: Python drops an exception raised while a weakref
    callback or ``__del__`` runs (printing "Exception ignored ... KeyboardInterrupt"), and the
    command would then carry on and exit 0 as if no Ctrl-C had come."""
    global _guarding, _raising, _interrupt_seen
    if _guarding:
        _interrupt_seen = False
        signal.signal(signal.SIGINT, _raise_interrupt)
        sys.unraisablehook = _drop_recorded_interrupts(sys.unraisablehook)
        _guarding = False
        _raising = True


def raise_if_interrupted() -> None:
    """The command returned: raise the KeyboardInterrupt of a Ctrl-C that Python dropped on the way."""
    if _raising and _interrupt_seen:
        raise KeyboardInterrupt


def finish() -> None:
    """The command's last line is being printed: the work is done (or abandoned), so from here a
    Ctrl-C is ignored. Raised now, it would escape the CLI's handlers, or interrupt Python's
    teardown with an "Exception ignored" traceback, and change the exit code after the fact."""
    global _raising
    if _raising:
        _raising = False
        signal.signal(signal.SIGINT, signal.SIG_IGN)
