"""The checksum the ``--resume`` journal records for an output shard (see
:mod:`ckptops.hdr.journal`), so that a resumed run reuses only shards that hold what the killed
run wrote. Every run takes it, of its whole output, as each shard is written: it must cost little.

XXH64 of the file (a C loop of the fused extension, ~11 GB/s on the machine measured; ``xxhsum``
gives the same value); without the extension, zlib's CRC-32 (~4 GB/s). sha256 (1.3 GB/s) made a
1B-parameter run about 25% slower on 2 busy cores, CRC-32 about 15%, XXH64 9% (records included). A
value names its kind (``xxh64:...``, ``crc32:...``), so that a file is checked with the function
that took its checksum. Not a cryptographic hash: it detects a shard that was damaged or never
reached the disk, which is what it is for.
"""

from __future__ import annotations

import zlib
from pathlib import Path

#: bytes per read when a file is checked
PIECE = 8 << 20


def _fused():
    from ckptops.hdr import fused

    return fused._fused


def kinds() -> list[str]:
    """The checksum kinds this installation computes, the preferred first."""
    return (["xxh64"] if _fused() is not None else []) + ["crc32"]


class Checksum:
    """A running checksum of bytes handed in order, in pieces of any size."""

    def __init__(self, kind: str | None = None) -> None:
        self.kind = kind or kinds()[0]
        if self.kind == "xxh64":
            self._fused = _fused()
            self._state = bytearray(self._fused.XXH64_STATE)
            self._fused.xxh64_update(self._state)
        elif self.kind == "crc32":
            self._crc = 0
        else:
            raise ValueError(f"unknown checksum kind {self.kind!r}")

    def update(self, data) -> None:
        if self.kind == "xxh64":
            self._fused.xxh64_update(self._state, data)
        else:
            self._crc = zlib.crc32(data, self._crc)

    def value(self) -> str:
        if self.kind == "xxh64":
            return f"xxh64:{self._fused.xxh64_digest(self._state):016x}"
        return f"crc32:{self._crc:08x}"


def file_checksum(path: Path, limit: int | None = None, kind: str | None = None) -> str:
    """The checksum of a file (or of its first ``limit`` bytes)."""
    check = Checksum(kind)
    buffer = bytearray(PIECE)
    view = memoryview(buffer)
    left = limit
    with open(path, "rb", buffering=0) as f:
        while left is None or left > 0:
            n = f.readinto(view if left is None else view[:min(PIECE, left)])
            if not n:
                break
            check.update(view[:n])
            if left is not None:
                left -= n
    return check.value()


def matches(path: Path, limit: int, recorded: str) -> bool:
    """The first ``limit`` bytes of ``path`` have the checksum ``recorded`` (False when its kind
    cannot be computed here: the extension that took it is not built)."""
    kind = str(recorded).split(":", 1)[0]
    return kind in kinds() and file_checksum(path, limit, kind) == recorded
