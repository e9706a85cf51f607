"""Split tensors into element ranges and run a per-chunk function over them on worker threads.

Every HDR operation is element-wise, so a tensor can be cut into flat element ranges regardless
of its shape; a 2 GiB embedding is then as cheap in memory as a norm weight. Each worker thread
owns its buffers (allocated once), torch runs single-threaded inside each worker, and ``pread``/
``pwrite``/torch kernels release the GIL, so two workers keep two cores busy.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch

from ckptops.checkpoint.reader import Staging

T = TypeVar("T")


@dataclass(frozen=True)
class Chunk:
    """Elements ``[start, stop)`` of the task's tensor."""

    task: object
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def split(task: object, start: int, stop: int, chunk: int) -> Iterator[Chunk]:
    for s in range(start, stop, chunk):
        yield Chunk(task, s, min(s + chunk, stop))


class WorkerBuffers:
    """The reusable memory of one worker: three float32 work buffers, an int32 key buffer, two
    boolean masks for band counting, a raw staging buffer for reads and one for the rounded output."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.a = torch.empty(chunk, dtype=torch.float32)
        self.b = torch.empty(chunk, dtype=torch.float32)
        self.c = torch.empty(chunk, dtype=torch.float32)
        self.key = torch.empty(chunk, dtype=torch.int32)
        self.below = np.empty(chunk, dtype=np.bool_)
        self.inside = np.empty(chunk, dtype=np.bool_)
        self.stage = Staging(chunk)
        self.out = Staging(chunk)

    @staticmethod
    def bytes_per_element() -> int:
        """Memory one worker needs per chunk element (for sizing chunks from --max-memory)."""
        return 4 * 3 + 4 + 2 + 8 * 2


class WorkerPool:
    """Runs ``fn(chunk, buffers, state)`` over chunks on ``workers`` threads; each thread gets its
    own :class:`WorkerBuffers` and its own ``state`` (made by ``make_state``), returned at the end
    so the caller can merge per-thread results (histograms, counters)."""

    def __init__(self, workers: int, chunk: int) -> None:
        self.workers = max(1, workers)
        self.chunk = chunk
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="ckptops")

    def _buffers(self) -> WorkerBuffers:
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = WorkerBuffers(self.chunk)
        return buffers

    def run(
        self,
        chunks: Iterable[Chunk],
        fn: Callable[[Chunk, WorkerBuffers, T], None],
        make_state: Callable[[], T],
        on_done: Callable[[Chunk], None] | None = None,
    ) -> list[T]:
        states: list[T] = []
        states_lock = threading.Lock()

        def call(chunk: Chunk) -> None:
            state = getattr(self._local, "state", None)
            if state is None or getattr(self._local, "generation", None) is not states:
                state = make_state()
                self._local.state, self._local.generation = state, states
                with states_lock:
                    states.append(state)
            fn(chunk, self._buffers(), state)
            if on_done is not None:
                on_done(chunk)

        # keep a bounded number of chunks in flight so that the generator stays lazy
        pending = []
        for chunk in chunks:
            pending.append(self._executor.submit(call, chunk))
            if len(pending) >= 4 * self.workers:
                pending.pop(0).result()
        for future in pending:
            future.result()
        return states

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


@contextmanager
def single_threaded_torch():
    """torch intra-op threads off while our own workers run (they would fight for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
