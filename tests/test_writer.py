"""Output files: out-of-order chunk writes give exactly the intended bytes, direct or buffered, and
the checksum the journal records for them (taken as written, or read back)."""

from __future__ import annotations

import os
import random

import pytest

from ckptops.checkpoint.checksum import Checksum, file_checksum, kinds
from ckptops.checkpoint.writer import BufferedFile, DirectFile, open_output


@pytest.mark.parametrize("kind", ["direct", "buffered"])
@pytest.mark.parametrize("size", [1, 4095, 4096, 3 * DirectFile.BLOCK + 12345])
def test_chunks_in_a_shuffled_window_land_in_place(tmp_path, kind, size):
    rng = random.Random(size)
    expected = rng.randbytes(size)
    cuts = sorted({0, size, *(rng.randrange(size) for _ in range(40))})
    chunks = [(a, expected[a:b]) for a, b in zip(cuts, cuts[1:])]
    # shuffle within windows of 6, as worker threads finish chunks out of order
    order = []
    for i in range(0, len(chunks), 6):
        window = chunks[i:i + 6]
        rng.shuffle(window)
        order += window
    path = tmp_path / "f.bin"
    if kind == "direct":
        try:
            file = DirectFile(path, size, hashed=True)
        except OSError:
            pytest.skip("O_DIRECT is not supported on this file system")
    else:
        file = BufferedFile(path, size)
    try:
        for offset, data in order:
            file.write_at(offset, memoryview(data))
        file.finish()
        check = file.checksum()
    finally:
        file.close()
    assert path.read_bytes() == expected
    assert check == file_checksum(path)
    whole = Checksum()
    whole.update(expected)
    assert check == whole.value()


def test_open_output_falls_back_when_direct_io_is_refused(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(DirectFile, "__init__", refuse)
    file = open_output(tmp_path / "g.bin", 10)
    assert isinstance(file, BufferedFile)
    file.write_at(0, memoryview(b"0123456789"))
    file.finish()
    file.close()
    assert (tmp_path / "g.bin").read_bytes() == b"0123456789"
    assert os.path.getsize(tmp_path / "g.bin") == 10


def test_checksum_does_not_depend_on_how_bytes_arrive():
    """XXH64 (the C loop; zlib's CRC-32 without the extension), whatever the pieces; the C loop
    gives the reference XXH64 values."""
    from ckptops.hdr import fused

    data = random.Random(3).randbytes(2 * 4096 + 1234)
    for kind in kinds():
        pieces = Checksum(kind)
        for a, b in [(0, 7), (7, 40), (40, 4099), (4099, len(data))]:
            pieces.update(data[a:b])
        whole = Checksum(kind)
        whole.update(data)
        assert pieces.value() == whole.value() and pieces.value().startswith(kind + ":")
    if fused._fused is not None:
        assert Checksum().kind == "xxh64"
        assert [_xxh64(x) for x in (b"", b"abc", bytes(range(256)) * 40)] == [
            "xxh64:ef46db3751d8e999", "xxh64:44bc2cf5ad770999", "xxh64:58b820aa7970dbe2"]


def _xxh64(data: bytes) -> str:
    check = Checksum("xxh64")
    check.update(data)
    return check.value()
