"""Retry Hub calls that failed for a transient reason, then give up with a clear error.

``huggingface_hub`` already resumes a download cut mid-stream (a few times, with HTTP ranges);
this layer sits above it and retries the whole call (a HEAD that timed out, a 5xx, a resume that
ran out of attempts), with exponential backoff. Anything else (repo not found, gated, offline)
fails at once. Tests set :data:`POLICY` to wait milliseconds instead of seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from ckptops.hub.explain import is_transient

T = TypeVar("T")


@dataclass
class RetryPolicy:
    """``attempts`` tries in all; waits ``base_wait``, then doubling, at most ``max_wait`` seconds."""

    attempts: int = 4
    base_wait: float = 2.0
    max_wait: float = 30.0

    def waits(self) -> list[float]:
        return [min(self.max_wait, self.base_wait * 2**i) for i in range(max(self.attempts - 1, 0))]


#: the policy every Hub call of ckptops uses
POLICY = RetryPolicy()


def with_retries(call: Callable[[], T], policy: RetryPolicy | None = None) -> T:
    """Run ``call``; on a transient failure wait and run it again; re-raise the last failure."""
    policy = policy or POLICY
    waits = policy.waits()
    while True:
        try:
            return call()
        except Exception as exc:
            if not waits or not is_transient(exc):
                raise
            time.sleep(waits.pop(0))
