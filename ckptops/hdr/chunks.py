"""Split tensors into element ranges and run a per-chunk function over them on worker threads.

Every HDR operation is element-wise, so a tensor can be cut into flat element ranges regardless
of its shape; a 2 GiB embedding is then as cheap in memory as a norm weight. Each worker thread
owns its buffers (allocated once), torch (when the torch path runs) is single-threaded inside each
worker, and ``pread``/``pwrite``/the fused loops/torch kernels release the GIL, so two workers
keep two cores busy. Nothing here imports torch: the fused path never needs it, and importing it
costs over a second.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

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
    """The reusable memory of one worker: three float32 work buffers, a key buffer, two
    boolean masks for band counting, a raw staging buffer for reads and one for the rounded output.

    The buffers are numpy arrays (``a_np`` ...); the torch path reads them as tensors (``a`` ...),
    which share the memory and are made on first use."""

    TORCH_VIEWS = ("a", "b", "c")

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.a_np = np.empty(chunk, dtype=np.float32)
        self.b_np = np.empty(chunk, dtype=np.float32)
        self.c_np = np.empty(chunk, dtype=np.float32)
        self.key_np = np.empty(chunk, dtype=np.uint32)
        self.below = np.empty(chunk, dtype=np.bool_)
        self.inside = np.empty(chunk, dtype=np.bool_)
        self.stage = Staging(chunk)
        self.out = Staging(chunk)

    def records(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(indices, taus, targets, bases) buffers for the one-read pass's in-band values (made
        on first use; only that pass needs them)."""
        found = self.__dict__.get("_records")
        if found is None:
            found = self._records = (np.empty(self.chunk, dtype=np.uint32), np.empty(self.chunk, dtype=np.float32),
                                     np.empty(self.chunk, dtype=np.float32), np.empty(self.chunk, dtype=np.float32))
        return found

    def __getattr__(self, name: str):
        if name in WorkerBuffers.TORCH_VIEWS:
            import torch

            view = torch.from_numpy(getattr(self, name + "_np"))
            setattr(self, name, view)
            return view
        raise AttributeError(name)

    @staticmethod
    def bytes_per_element() -> int:
        """Memory one worker needs per chunk element (for sizing chunks from --max-memory)."""
        return 4 * 3 + 4 + 2 + 8 * 2 + 16


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


_pins = {"active": 0, "saved": None}
_pins_lock = threading.Lock()


def _pin_locked() -> None:
    import torch

    if _pins["saved"] is None:
        _pins["saved"] = torch.get_num_threads()
        torch.set_num_threads(1)


@contextmanager
def single_threaded_torch():
    """torch intra-op threads off while our own workers run (they would fight for the cores).

    torch is not imported for this: if the run never needs it (the fused path), nothing is
    touched; if a torch-path kernel imports it during the run, :func:`torch_for_workers` pins
    it then. The thread count is restored when the last run ends."""
    with _pins_lock:
        _pins["active"] += 1
        if "torch" in sys.modules:
            _pin_locked()
    try:
        yield
    finally:
        with _pins_lock:
            _pins["active"] -= 1
            if _pins["active"] == 0 and _pins["saved"] is not None:
                import torch

                torch.set_num_threads(_pins["saved"])
                _pins["saved"] = None


def torch_for_workers():
    """The torch module for a torch-path kernel: imported on first use and, inside
    :func:`single_threaded_torch`, pinned to one intra-op thread."""
    import torch

    with _pins_lock:
        if _pins["active"]:
            _pin_locked()
    return torch
