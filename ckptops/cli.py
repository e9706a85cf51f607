"""The ``ckptops`` command line: a click group that only parses, calls the library and prints.

Commands live in :mod:`ckptops.commands` (one module per job) and are registered here. Errors
from the library (:class:`ckptops.errors.CkptopsError`) are printed as one ``error:`` line with a
non-zero exit code; no traceback reaches the user unless ``CKPTOPS_DEBUG=1`` is set.
"""

from __future__ import annotations

import errno
import os
import sys

import click

from ckptops import __version__
from ckptops.errors import CkptopsError


class _Group(click.Group):
    """A click group that turns library errors into one-line messages."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CkptopsError as exc:
            if os.environ.get("CKPTOPS_DEBUG"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted; no output was written", err=True)
            ctx.exit(130)
        except OSError as exc:
            if os.environ.get("CKPTOPS_DEBUG"):
                raise
            if exc.errno == errno.EPIPE:
                ctx.exit(0)
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            click.echo(f"error: {exc.strerror or exc}{where}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckptops")
def main() -> None:
    """Safety Arithmetic on checkpoint files, with no training.

    \b
    sanitize   remove the harm direction from a model's weights (streaming, low RAM)
    icv        compute, inspect and export the Safe-Align in-context vector
    generate   try a model with and without its in-context vector
    eval       measure refusals, over-refusal and perplexity offline
    tune       search HDR scale/top-k and ICV strength against behaviour
    run        run a recipe (HDR, then the ICV, then push) from a TOML file
    diff       where an edited model differs from its base (the edit area)
    inspect    list and validate the tensors of a checkpoint (folder or Hub repo)
    push       upload an output folder to a Hugging Face Hub model repo
    demo       run sanitize on a small generated model (no network)

    Run `ckptops COMMAND --help` for each command's options and examples.
    """


def _register() -> None:
    """Add every command module's commands; a module that is not there yet is skipped."""
    import importlib

    for name in ("sanitize", "demo", "icv", "evaluate", "hub", "recipe", "harm", "tune"):
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
    if "torch" not in sys.modules:
        sys.exit(code)
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
