"""Read tensor bytes straight into reusable buffers with ``pread``.

No mmap (its pages count toward RSS) and no fresh tensor per read: a streaming pass over billions
of values stays fast only when the same few megabytes of buffers are reused (see DESIGN.md).
Buffers are numpy arrays; torch is imported only when the torch code path asks for a tensor.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from ckptops.checkpoint.dtypes import NUMPY_FLOATS, itemsize, torch_dtype, widen_into
from ckptops.checkpoint.header import TensorInfo
from ckptops.checkpoint.resolve import Checkpoint
from ckptops.errors import CheckpointError


class OpenFiles:
    """File descriptors of the shards in use, opened once and shared by all worker threads
    (``pread`` does not move a file position, so sharing is safe)."""

    def __init__(self) -> None:
        self._fds: dict[tuple[int, str], tuple[int, str]] = {}
        self._lock = threading.Lock()
        #: bytes read through these files, per checkpoint (``id(checkpoint)``): the report's
        #: "read per input", and what the one-read pass is measured by
        self.read_bytes: dict[int, int] = {}

    def count(self, checkpoint: Checkpoint, nbytes: int) -> None:
        with self._lock:
            self.read_bytes[id(checkpoint)] = self.read_bytes.get(id(checkpoint), 0) + nbytes

    def fd(self, checkpoint: Checkpoint, shard: str) -> tuple[int, str]:
        key = (id(checkpoint), shard)
        found = self._fds.get(key)
        if found is None:
            with self._lock:
                found = self._fds.get(key)
                if found is None:
                    path: Path = checkpoint.shard_path(shard)
                    found = (os.open(path, os.O_RDONLY), str(path))
                    self._fds[key] = found
        return found

    def prefetch(self, checkpoint: Checkpoint, info: TensorInfo, start: int, stop: int) -> None:
        """Ask the kernel to start reading elements ``[start, stop)`` of a local shard now
        (POSIX_FADV_WILLNEED returns at once), so that scattered reads - the selection sample -
        reach the disk together instead of one at a time. Synthetic (LoRA) inputs have no file."""
        advise = getattr(os, "posix_fadvise", None)
        if advise is None or checkpoint.synthetic is not None:
            return
        fd, _ = self.fd(checkpoint, info.shard)
        size = itemsize(info.dtype)
        advise(fd, info.offset + start * size, (stop - start) * size, os.POSIX_FADV_WILLNEED)

    def close(self, checkpoint: Checkpoint | None = None, shard: str | None = None) -> None:
        with self._lock:
            for key in list(self._fds):
                if checkpoint is None or (key[0] == id(checkpoint) and (shard is None or key[1] == shard)):
                    os.close(self._fds.pop(key)[0])


def pread_into(fd: int, view: memoryview, offset: int, where: str) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; a short file is an error naming it."""
    done, total = 0, len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{where}: file ended early at byte {offset + done} (truncated or changed while reading)")
        done += n


def byte_view(array) -> memoryview:
    """A writable byte view of a contiguous CPU numpy array or torch tensor (for pread/pwrite)."""
    if isinstance(array, np.ndarray):
        return memoryview(array.reshape(-1).view(np.uint8))
    import torch

    if array.dtype == torch.bfloat16:
        array = array.view(torch.int16)
    return memoryview(array.numpy()).cast("B")


class Staging:
    """Per-worker raw byte buffer through which non-float32 tensors are read and converted."""

    def __init__(self, chunk: int) -> None:
        self.raw_np = np.empty(chunk * 8, dtype=np.uint8)
        self.view = memoryview(self.raw_np)

    @property
    def raw(self):
        """The buffer as a torch uint8 tensor (same memory; the torch path only)."""
        raw = self.__dict__.get("_raw")
        if raw is None:
            import torch

            raw = self.__dict__["_raw"] = torch.from_numpy(self.raw_np)
        return raw

    def read_f32(self, files: OpenFiles, checkpoint: Checkpoint, info: TensorInfo, start: int, stop: int, out) -> None:
        """Read elements ``[start, stop)`` of ``info`` into ``out[:stop-start]`` as float32
        (``out``: a float32 numpy array or torch tensor)."""
        if checkpoint.synthetic is not None:
            checkpoint.synthetic.read_f32(self, files, info, start, stop, out)
            return
        n = stop - start
        fd, where = files.fd(checkpoint, info.shard)
        size = itemsize(info.dtype)
        offset = info.offset + start * size
        files.count(checkpoint, n * size)
        if info.dtype == "F32":
            pread_into(fd, byte_view(out[:n]), offset, where)
            return
        pread_into(fd, self.view[: n * size], offset, where)
        if not isinstance(out, np.ndarray):
            out[:n].copy_(self.raw[: n * size].view(torch_dtype(info.dtype)))
            return
        widen_into(self.raw_np[: n * size], info.dtype, out[:n])

    def read_native(
        self, files: OpenFiles, checkpoint: Checkpoint, info: TensorInfo, start: int, stop: int, out: np.ndarray
    ) -> tuple[memoryview, bool]:
        """Elements ``[start, stop)`` into the float32 array ``out``'s memory as bfloat16 bytes
        when the tensor is bfloat16 (no conversion; the fused loops widen it), else as float32
        (converted here). Returns the bytes and whether they are bfloat16."""
        if checkpoint.synthetic is not None:
            return checkpoint.synthetic.read_native(self, files, info, start, stop, out)
        if info.dtype != "BF16":
            self.read_f32(files, checkpoint, info, start, stop, out)
            return byte_view(out[: stop - start]), False
        fd, where = files.fd(checkpoint, info.shard)
        view = byte_view(out)[: 2 * (stop - start)]
        files.count(checkpoint, len(view))
        pread_into(fd, view, info.offset + start * 2, where)
        return view, True

    def read_raw(self, files: OpenFiles, checkpoint: Checkpoint, info: TensorInfo, start: int, stop: int) -> memoryview:
        """Elements ``[start, stop)`` of ``info`` as raw bytes (valid until the next read)."""
        if checkpoint.synthetic is not None:
            return checkpoint.synthetic.read_raw(self, files, info, start, stop)
        fd, where = files.fd(checkpoint, info.shard)
        size = itemsize(info.dtype)
        n = (stop - start) * size
        files.count(checkpoint, n)
        pread_into(fd, self.view[:n], info.offset + start * size, where)
        return self.view[:n]

    def raw_as(self, dtype_code: str, count: int):
        """The first ``count`` elements of the buffer as a torch tensor of that dtype."""
        return self.raw[: count * itemsize(dtype_code)].view(torch_dtype(dtype_code))

    def raw_np_as(self, dtype_code: str, count: int) -> np.ndarray:
        """The first ``count`` elements as a numpy array of a float code (bfloat16 as uint16 bits)."""
        return self.raw_np[: count * itemsize(dtype_code)].view(NUMPY_FLOATS[dtype_code])


__all__ = ["OpenFiles", "Staging", "pread_into", "byte_view"]
