"""Read tensor bytes straight into reusable buffers with ``pread``.

No mmap (its pages count toward RSS) and no fresh tensor per read: a streaming pass over billions
of values stays fast only when the same few megabytes of buffers are reused (see DESIGN.md).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from ckptops.checkpoint.dtypes import itemsize, torch_dtype
from ckptops.checkpoint.header import TensorInfo
from ckptops.checkpoint.resolve import Checkpoint
from ckptops.errors import CheckpointError


class OpenFiles:
    """File descriptors of the shards in use, opened once and shared by all worker threads
    (``pread`` does not move a file position, so sharing is safe)."""

    def __init__(self) -> None:
        self._fds: dict[tuple[int, str], tuple[int, str]] = {}
        self._lock = threading.Lock()

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


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (for pread/pwrite)."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return memoryview(tensor.numpy()).cast("B")


class Staging:
    """Per-worker raw byte buffer through which non-float32 tensors are read and converted."""

    def __init__(self, chunk: int) -> None:
        self.raw = torch.empty(chunk * 8, dtype=torch.uint8)
        self.view = byte_view(self.raw)

    def read_f32(
        self, files: OpenFiles, checkpoint: Checkpoint, info: TensorInfo, start: int, stop: int, out: torch.Tensor
    ) -> None:
        """Read elements ``[start, stop)`` of ``info`` into ``out[:stop-start]`` as float32."""
        n = stop - start
        fd, where = files.fd(checkpoint, info.shard)
        size = itemsize(info.dtype)
        offset = info.offset + start * size
        if info.dtype == "F32":
            pread_into(fd, byte_view(out[:n]), offset, where)
            return
        pread_into(fd, self.view[: n * size], offset, where)
        out[:n].copy_(self.raw[: n * size].view(torch_dtype(info.dtype)))

    def read_native(
        self, files: OpenFiles, checkpoint: Checkpoint, info: TensorInfo, start: int, stop: int, out: torch.Tensor
    ) -> tuple[memoryview, bool]:
        """Elements ``[start, stop)`` into ``out``'s memory as bfloat16 bytes when the tensor is
        bfloat16 (no conversion; the fused loops widen it), else as float32 (converted here).
        Returns the bytes and whether they are bfloat16."""
        if info.dtype != "BF16":
            self.read_f32(files, checkpoint, info, start, stop, out)
            return byte_view(out[: stop - start]), False
        fd, where = files.fd(checkpoint, info.shard)
        view = byte_view(out)[: 2 * (stop - start)]
        pread_into(fd, view, info.offset + start * 2, where)
        return view, True

    def read_raw(self, files: OpenFiles, checkpoint: Checkpoint, info: TensorInfo, start: int, stop: int) -> memoryview:
        """Elements ``[start, stop)`` of ``info`` as raw bytes (valid until the next read)."""
        fd, where = files.fd(checkpoint, info.shard)
        size = itemsize(info.dtype)
        n = (stop - start) * size
        pread_into(fd, self.view[:n], info.offset + start * size, where)
        return self.view[:n]

    def raw_as(self, dtype_code: str, count: int) -> torch.Tensor:
        return self.raw[: count * itemsize(dtype_code)].view(torch_dtype(dtype_code))


__all__ = ["OpenFiles", "Staging", "pread_into", "byte_view"]
