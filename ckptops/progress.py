"""Progress bars over bytes with throughput, silent when asked or when stderr is not a terminal."""

from __future__ import annotations

import sys
import threading

from tqdm.auto import tqdm


class ByteProgress:
    """A thread-safe tqdm bar counting bytes (shows B/s); a no-op when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool | None = None) -> None:
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                         dynamic_ncols=True, leave=False, disable=not enabled)
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "ByteProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
