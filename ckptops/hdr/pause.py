"""A test seam: stop a run at a named point so that a test can kill it there (``kill -9``).

With ``CKPTOPS_PAUSE_AT=<point>`` in the environment, the run writes the file named by
``CKPTOPS_PAUSE_MARKER`` when it reaches that point and then waits (an hour) for the test to
kill it. Points: ``selection`` (after the sample, before the pass), ``apply`` (mid-pass: half of
the output shards, at least one, finished and journaled), ``correction`` (the pass done, before
the corrections are written), ``patch`` (the first tensor's corrections written), ``publish`` (the
shards complete, the index written, before the card). Unset, it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import time

POINTS = ("selection", "apply", "correction", "patch", "publish")


def pause_point(name: str) -> None:
    if os.environ.get("CKPTOPS_PAUSE_AT") != name:
        return
    marker = os.environ.get("CKPTOPS_PAUSE_MARKER")
    if marker:
        with open(marker, "w", encoding="utf-8") as file:
            file.write(name)
    time.sleep(3600)
