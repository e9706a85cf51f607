"""How many CPU threads torch may use when a command runs a model (``--threads``).

Why this exists: torch's default uses every core. When other work already occupies those cores
(a shared box, a second job, CI), its worker threads spin waiting on each other; measured on a
loaded 2-core machine, ``icv compute`` took 251 s with torch's default against 26 s with one
thread, and generation ran at 2.6 against 28.8 tokens/s. The default here therefore counts the
cores that are actually free (cores minus the 1-minute load average, at least one), which is
every core on an idle workstation and one on a busy box. ``--threads N`` overrides it.
"""

from __future__ import annotations

import os

import click


def default_threads() -> int:
    """Free cores now: ``cpu_count - loadavg(1 min)``, rounded down, clamped to [1, cpu_count]."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return cores
    return max(1, min(cores, int(cores - busy)))


def use_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (``None``: :func:`default_threads`); returns the number used.

    Imports torch, so call it only in commands that are about to run a model."""
    count = default_threads() if threads is None else threads
    if count < 1:
        from ckptops.errors import UsageError

        raise UsageError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(count)
    return count


def threads_option(func):
    """The shared ``--threads N`` click option (passed to the command as ``threads``)."""
    return click.option(
        "--threads", type=int, default=None, metavar="N",
        help="CPU threads for torch (default: the free cores, cores minus the load average; "
             "on a busy machine 1 thread is often 5-10x faster than torch's default).",
    )(func)
