"""The ``ckptops`` command line: a click group that only parses, calls the library and prints.

Commands live in :mod:`ckptops.commands` (one module per job) and are registered here. Errors
from the library (:class:`ckptops.errors.CkptopsError`) are printed as one ``error:`` line with a
non-zero exit code; no traceback reaches the user unless ``CKPTOPS_DEBUG=1`` is set.
"""

from __future__ import annotations

import os
import signal
import sys

from ckptops import _startup

_startup.guard()  # until the imports below are done, Ctrl-C prints one line and exits 130

import contextlib  # noqa: E402
import errno  # noqa: E402

import click  # noqa: E402

from ckptops import __version__  # noqa: E402
from ckptops.errors import CkptopsError  # noqa: E402


@contextlib.contextmanager
def _warnings_as_lines():
    """ckptops' own warnings as one ``warning: <text>`` line each (once per text); library
    warnings keep Python's format."""
    import warnings

    original = warnings.showwarning
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if "ckptops" not in str(filename):
            return original(message, category, filename, lineno, file, line)
        text = " ".join(str(message).split())
        if text not in seen:
            seen.add(text)
            click.echo(f"warning: {text}", err=True)

    with warnings.catch_warnings():
        warnings.filterwarnings("always", module="ckptops")  # each run shows its own (deduplicated above)
        warnings.showwarning = show
        yield


def _quiet_libraries_in_logs() -> None:
    """When stderr is not a terminal (a log file, CI), keep transformers', huggingface_hub's and
    tqdm's loading bars and advisory notices out of it: a bar redrawn as lines floods a log.
    Set before those libraries are imported (they read these at import); a value the user set
    wins. ckptops' own bars already stay off without a terminal."""
    try:
        interactive = sys.stderr.isatty()
    except (AttributeError, ValueError):
        interactive = False
    if interactive:
        return
    for name, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"), ("TQDM_DISABLE", "1")):
        os.environ.setdefault(name, value)
    for module in ("transformers", "huggingface_hub"):  # already imported (library use): tell them too
        if module in sys.modules:
            try:
                if module == "transformers":
                    sys.modules[module].utils.logging.set_verbosity_error()
                    sys.modules[module].utils.logging.disable_progress_bar()
                else:
                    sys.modules[module].utils.disable_progress_bars()
            except AttributeError:
                pass


def _printable(arg: str) -> str:
    """An argument with lone surrogates, as text a terminal can show: the bytes a file name held
    (surrogateescape, e.g. ``\\xff``), else the code point (``\\ud800``)."""
    try:
        return arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return arg.encode("utf-8", "backslashreplace").decode("utf-8")


class _Group(click.Group):
    """A click group that turns library errors into one-line messages."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Refuse an argument holding bytes that are not UTF-8 (Python reads them as lone
        surrogates): ckptops writes the paths it was given into model cards, recipes and
        reports, UTF-8 text that cannot hold them, and would fail only when writing them, at
        the end of the work."""
        for position, arg in enumerate(args):
            try:
                arg.encode("utf-8")
            except UnicodeEncodeError:
                option = args[position - 1] if position and args[position - 1].startswith("-") else ""
                which = f"the value of {option} " if option else "argument "
                click.echo(f"error: {which}'{_printable(arg)}' is not valid Unicode (it holds bytes that are not "
                           "UTF-8); ckptops writes its arguments into UTF-8 text (model cards, recipes, reports): "
                           "pass UTF-8 text (for a path, rename the file or folder)", err=True)
                ctx.exit(2)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        _startup.release()  # from here Ctrl-C is a KeyboardInterrupt, turned into one line below
        _startup.forget_published()
        _quiet_libraries_in_logs()
        try:
            with _warnings_as_lines():
                result = super().invoke(ctx)
            _startup.raise_if_interrupted()  # a Ctrl-C that Python dropped (in a weakref callback, a __del__)
            return result  # (the finally below ignores a later Ctrl-C: the command printed its last line)
        except CkptopsError as exc:
            _startup.finish()
            if os.environ.get("CKPTOPS_DEBUG"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            _startup.finish()
            click.echo(_startup.interrupted_message(), err=True)
            ctx.exit(130)
        except RecursionError:
            _startup.finish()
            # deeply nested input that a parser did not catch; never a traceback
            if os.environ.get("CKPTOPS_DEBUG"):
                raise
            click.echo("error: input nested too deeply to read", err=True)
            ctx.exit(1)
        except OSError as exc:
            _startup.finish()
            if os.environ.get("CKPTOPS_DEBUG"):
                raise
            if exc.errno == errno.EPIPE:
                ctx.exit(0)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                where = exc.filename or _startup.output_named(sys.argv[1:]) or "the output"
                click.echo(f"error: {where}: no space left on the disk; free space or write elsewhere "
                           "(outputs are moved into place only when complete: nothing partial was kept)", err=True)
                ctx.exit(1)
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            click.echo(f"error: {exc.strerror or exc}{where}", err=True)
            ctx.exit(1)
        finally:
            _startup.finish()  # any other ending (click's own exits, an unexpected error) as well


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckptops")
def main() -> None:
    """Safety Arithmetic on checkpoint files, with no training.

    \b
    sanitize   remove the harm direction from a model's weights (streaming, low RAM)
    diagnose   will HDR help this target? how it drifted, against the harm vector
    icv        compute, inspect and export the Safe-Align in-context vector
    generate   try a model with and without its in-context vector
    eval       measure refusals, over-refusal and perplexity offline
    tune       search HDR scale/top-k and ICV strength against behaviour
    run        run a recipe (HDR, then the ICV, then push) from a TOML file
    diff       where an edited model differs from its base (the edit area)
    inspect    list and validate the tensors of a checkpoint (folder or Hub repo)
    push       upload an output folder to a Hugging Face Hub model repo
    harm       build a harm direction when you have none (a LoRA trained on compliance openings)
    demo       run sanitize on a small generated model (no network)

    Run `ckptops COMMAND --help` for each command's options and examples.
    """


def _register() -> None:
    """Add every command module's commands; a module that is not there yet is skipped."""
    import importlib

    for name in ("sanitize", "diagnose", "demo", "icv", "evaluate", "hub", "recipe", "harm", "tune"):
        try:
            module = importlib.import_module(f"ckptops.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"ckptops.commands.{name}":
                continue
            raise
        for command in getattr(module, "COMMANDS", []):
            main.add_command(command)


_register()


def console() -> None:
    """The ``ckptops`` executable: run the CLI, then leave without the interpreter's teardown.

    Once torch is loaded, a normal interpreter exit spends about half a second in torch's exit
    handlers and module teardown, more than some whole commands take. Every file ckptops writes
    is closed and synced before a command returns, so after flushing stdout, stderr and logging
    the process can end at once. (Library users and ``CliRunner`` call :func:`main` instead.)
    """
    code: int = 0
    try:
        main()
    except SystemExit as exc:
        if isinstance(exc.code, int):
            code = exc.code
        elif exc.code is not None:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:  # between click's own handlers: still one line, exit 130
        print(_startup.interrupted_message(), file=sys.stderr)
        code = 130
    # the work is done (or abandoned): a late Ctrl-C must not kill the process mid-teardown
    # (exit status -2, no message) nor raise in an exit handler
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:
        pass
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    console()
