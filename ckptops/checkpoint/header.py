"""Parse and validate safetensors headers without trusting them.

A safetensors file is ``u64 little-endian N`` + ``N bytes of JSON`` + the tensor data. The JSON maps
tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data
area) plus an optional ``__metadata__`` string map. Everything here comes from a file the user may
have been sent by anyone, so every field is checked before a byte of data is read: size caps (the
same 100 MB header cap as safetensors itself), JSON shape, known dtypes, sizes that match shapes,
offsets inside the file, no overlaps, no duplicate names. :func:`parse_header` works on bytes so
that remote files (range requests) are validated by the same code as local ones.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ckptops.checkpoint.dtypes import SAFETENSORS_DTYPES
from ckptops.errors import HeaderError

#: safetensors refuses headers larger than this; so do we
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its shard file, absolute byte offset, dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: str  # shard file name (relative to the checkpoint folder)
    offset: int  # absolute offset of the first byte in the shard file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ShardHeader:
    """A validated header: the tensors of one shard file in data order, and its metadata."""

    name: str
    file_size: int
    header_len: int
    tensors: list[TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    raw: bytes = b""

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _no_constant(name: str):
    """NaN and Infinity are not JSON (Python's parser accepts them; safetensors does not)."""
    raise ValueError(f"{name} is not a JSON value")


def header_length(prefix: bytes, file_size: int, where: str) -> int:
    """Read and check the 8-byte length prefix of a safetensors file of ``file_size`` bytes."""
    if file_size < 8 or len(prefix) < 8:
        raise HeaderError(f"{where}: file is {file_size} bytes, too short to be safetensors (truncated?)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise HeaderError(f"{where}: header length {n} bytes is over the {MAX_HEADER_BYTES} byte cap")
    if 8 + n > file_size:
        raise HeaderError(f"{where}: header length {n} bytes runs past the end of the {file_size}-byte file (truncated?)")
    if n < 2:
        raise HeaderError(f"{where}: header length {n} is too small to hold a JSON object")
    return n


#: safetensors counts elements and bytes in 64-bit unsigned integers and refuses any overflow
_U64 = 1 << 64


def _printable(text: str) -> bool:
    """Whether a string from the header is valid Unicode (JSON can spell lone surrogates such as
    ``\\ud800``; safetensors refuses them, and they cannot be printed or written back)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(text: str) -> str:
    """A header string as it can be printed in a one-line message, whatever it holds."""
    return ascii(text) if not _printable(text) else repr(text)


def _element_count(shape: list[int]) -> int | None:
    """The product of ``shape`` as safetensors computes it (left to right, checked in 64 bits):
    None if any partial product overflows, even when a later dimension is 0."""
    count = 1
    for dim in shape:
        count *= dim
        if count >= _U64:
            return None
    return count


def parse_header(name: str, raw: bytes, file_size: int, where: str | None = None) -> ShardHeader:
    """Validate the JSON header ``raw`` of a file of ``file_size`` bytes; raise HeaderError.

    At least as strict as safetensors itself (checked by a seeded fuzzer in the tests against
    ``safe_open``), so that every accepted input gives an output that safetensors opens."""
    where = where or name
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise HeaderError(f"{where}: header JSON is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise HeaderError(f"{where}: header is not valid JSON ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(obj, dict):
        raise HeaderError(f"{where}: header is JSON but not an object")
    try:  # a lone surrogate anywhere (even in an ignored field) makes safetensors refuse the file
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise HeaderError(f"{where}: header holds a lone surrogate escape (\\ud800-\\udfff), not valid Unicode") from None
    except RecursionError:
        raise HeaderError(f"{where}: header JSON is nested too deeply") from None
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    metadata = obj.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _printable(k) and _printable(v) for k, v in metadata.items()
    ):
        raise HeaderError(f"{where}: __metadata__ must be an object mapping strings to strings")

    entries: list[tuple[int, int, TensorInfo]] = []
    for tname, spec in obj.items():
        if not _printable(tname):
            raise HeaderError(f"{where}: tensor name {_shown(tname)} is not valid Unicode (lone surrogate)")
        if not isinstance(spec, dict):
            raise HeaderError(f"{where}: tensor {tname!r}: entry is not an object")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise HeaderError(f"{where}: tensor {tname!r}: unknown dtype {_shown(str(dtype))[:80]}")
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < _U64 for s in shape
        ):
            raise HeaderError(f"{where}: tensor {tname!r}: shape {str(shape)[:80]} is not a list of non-negative 64-bit integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o < _U64 for o in offsets)
        ):
            raise HeaderError(f"{where}: tensor {tname!r}: data_offsets {str(offsets)[:80]} must be two non-negative integers")
        begin, end = offsets
        if end < begin:
            raise HeaderError(f"{where}: tensor {tname!r}: data_offsets {offsets} are not an increasing pair")
        count = _element_count(shape)
        if count is None or count * SAFETENSORS_DTYPES[dtype][0] >= _U64:
            raise HeaderError(f"{where}: tensor {tname!r}: shape {shape} overflows a 64-bit element count")
        size = SAFETENSORS_DTYPES[dtype][0] * count
        if end - begin != size:
            raise HeaderError(
                f"{where}: tensor {tname!r}: {dtype} {tuple(shape)} needs {size} bytes but data_offsets span {end - begin}"
            )
        if end > data_size:
            raise HeaderError(
                f"{where}: tensor {tname!r}: data_offsets end {end} is beyond the data area of {data_size} bytes (truncated file?)"
            )
        info = TensorInfo(tname, dtype, tuple(shape), name, data_start + begin, size)
        entries.append((begin, end, info))

    entries.sort(key=lambda e: (e[0], e[1]))
    position, previous = 0, None
    for begin, end, info in entries:
        if begin < position:
            raise HeaderError(f"{where}: tensors {previous!r} and {info.name!r} overlap in the file")
        if begin > position:
            raise HeaderError(f"{where}: {begin - position} unused bytes before tensor {info.name!r} (offsets must be contiguous)")
        position, previous = max(position, end), info.name
    if position != data_size:
        raise HeaderError(
            f"{where}: tensors cover {position} bytes but the data area is {data_size} bytes "
            f"({'truncated' if position > data_size else 'trailing bytes'})"
        )
    return ShardHeader(name, file_size, len(raw), [e[2] for e in entries], dict(metadata), raw)


def read_header(path: Path, name: str | None = None) -> ShardHeader:
    """Read and validate the header of a local safetensors file."""
    path = Path(path)
    name = name or path.name
    from ckptops.safeio import open_regular

    with os.fdopen(open_regular(path, HeaderError, "safetensors file"), "rb") as f:  # no FIFO, no device
        size = os.fstat(f.fileno()).st_size
        n = header_length(f.read(8), size, str(path))
        raw = f.read(n)
    if len(raw) != n:
        raise HeaderError(f"{path}: file ended inside the header (truncated)")
    return parse_header(name, raw, size, str(path))
