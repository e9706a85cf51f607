"""Write safetensors shards header first, then tensor bytes at known offsets.

All shapes and dtypes are known from the plan, so each shard's header (and therefore every
tensor's byte offset) is fixed before any data is computed. Worker threads then ``pwrite`` their
chunks straight to the right place, in any order, without holding a tensor in memory.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ckptops.checkpoint.dtypes import itemsize
from ckptops.errors import OutputError


@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return itemsize(self.dtype) * math.prod(self.shape)


@dataclass
class OutShard:
    name: str
    tensors: list[OutTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def layout_like_target(tensors: list[tuple[OutTensor, str]]) -> list[OutShard]:
    """Keep the target's shard files: ``tensors`` is (tensor, target shard name) in target order."""
    shards: dict[str, OutShard] = {}
    for tensor, shard_name in tensors:
        shards.setdefault(shard_name, OutShard(shard_name)).tensors.append(tensor)
    return list(shards.values())


def layout_by_size(tensors: list[OutTensor], max_bytes: int) -> list[OutShard]:
    """Pack tensors in order into shards of at most ``max_bytes`` (a larger tensor gets its own),
    named like transformers' ``save_pretrained`` names them."""
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    if len(groups) == 1:
        return [OutShard("model.safetensors", groups[0])]
    count = len(groups)
    return [OutShard(f"model-{i + 1:05d}-of-{count:05d}.safetensors", g) for i, g in enumerate(groups)]


def header_bytes(shard: OutShard, metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """The 8-byte length prefix + JSON header (space-padded to 8 bytes, as safetensors does) and
    the absolute file offset of every tensor."""
    entries: dict[str, object] = {"__metadata__": dict(metadata)}
    relative: dict[str, int] = {}
    position = 0
    for tensor in shard.tensors:
        entries[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [position, position + tensor.nbytes],
        }
        relative[tensor.name] = position
        position += tensor.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    prefix = len(text).to_bytes(8, "little")
    return prefix + text, {name: start + off for name, off in relative.items()}


class ShardWriter:
    """Creates every output shard in ``folder`` (header written, file sized) and accepts
    ``write(name, byte_offset_in_tensor, data)`` calls from any thread."""

    def __init__(self, folder: Path, shards: list[OutShard], metadata: dict[str, str]) -> None:
        self.folder = Path(folder)
        self.shards = shards
        self._where: dict[str, tuple[int, int, int]] = {}  # tensor -> (fd, absolute offset, nbytes)
        self._fds: list[int] = []
        try:
            for shard in shards:
                head, offsets = header_bytes(shard, metadata)
                fd = os.open(self.folder / shard.name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                os.pwrite(fd, head, 0)
                os.ftruncate(fd, len(head) + shard.nbytes)
                for tensor in shard.tensors:
                    self._where[tensor.name] = (fd, offsets[tensor.name], tensor.nbytes)
        except OSError as exc:
            self.close()
            raise OutputError(f"{self.folder}: cannot create output shards ({exc.strerror or exc})") from None

    def write(self, name: str, byte_offset: int, data) -> None:
        fd, start, nbytes = self._where[name]
        view = memoryview(data).cast("B")
        if byte_offset + len(view) > nbytes:
            raise AssertionError(f"write past the end of {name}")
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], start + byte_offset + done)

    def weight_map(self) -> dict[str, str]:
        return {t.name: s.name for s in self.shards for t in s.tensors}

    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def finish(self) -> None:
        for fd in self._fds:
            os.fsync(fd)
        self.close()

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.pop())
