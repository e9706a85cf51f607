"""Property test: ckptops' header validation against safetensors' own, on seeded random mutations.

Every mutated file that ckptops accepts must open with ``safetensors.safe_open`` and give back the
same tensors (a sanitize output built from it would otherwise be unreadable); every refusal must
be one ``error: <file>: ...`` line through the CLI, never a traceback. Mutations are the classes an
outside test pass used: wrong JSON types in every field, deep nesting, huge and overflowing shapes
(with a 0 dimension), lone surrogates, ``__metadata__`` of the wrong shape, shifted offsets, length
prefixes that lie, trailing and missing bytes.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest

from ckptops.checkpoint.header import read_header
from ckptops.errors import CkptopsError

CASES = 400
WEIRD_VALUES = [None, True, False, 0, -1, 1.5, "F32", "x", [], {}, ["F32"], {"a": 1}, [1, 2],
                [[1]], 2 ** 64, 2 ** 63, -2 ** 63, "\ud800", 1e400, [2 ** 40, 2 ** 40, 0],
                [0, 2 ** 62, 2 ** 62], [2 ** 64], [-1], [True], ["1"], [1.0]]


def _valid_header() -> dict:
    return {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
        "c": {"dtype": "I64", "shape": [], "data_offsets": [32, 40]},
        "d": {"dtype": "F16", "shape": [0, 5], "data_offsets": [40, 40]},
    }


def _mutate(rng: random.Random, header: dict) -> tuple[dict | list | str, int]:
    """One random change; returns (header JSON value or raw text, extra data bytes delta)."""
    try:
        return _mutate_once(rng, header)
    except (KeyError, ValueError, TypeError):  # a second mutation on an entry the first broke
        return header, 0


def _mutate_once(rng: random.Random, header: dict) -> tuple[dict | list | str, int]:
    kind = rng.randrange(14)
    names = [k for k in header if k != "__metadata__" and isinstance(header[k], dict)]
    if not names:
        return header, 0
    name = rng.choice(names)
    if kind == 0:
        header[name]["dtype"] = rng.choice(WEIRD_VALUES + ["F64", "U8", "BOOL", "F8_E5M2", "f32", "Q4"])
    elif kind == 1:
        header[name]["shape"] = rng.choice(WEIRD_VALUES)
    elif kind == 2:
        header[name]["data_offsets"] = rng.choice(WEIRD_VALUES + [[0, 0], [40, 48], [24, 0], [0, 2 ** 64]])
    elif kind == 3:
        header["__metadata__"] = rng.choice(WEIRD_VALUES + [{"k": 1}, {"k": None}, {"k": ["v"]}, {"\ud800": "v"}])
    elif kind == 4:
        header[rng.choice(["\ud800", "\udfff x", "", "é", "__metadata__x", "a\u0000b"])] = header.pop(name)
    elif kind == 5:
        depth = rng.choice([10, 100, 3000, 100000])
        return "{" + '"x":' + "[" * depth + "]" * depth + "}", 0
    elif kind == 6:
        header[name] = rng.choice(WEIRD_VALUES)
    elif kind == 7:
        return rng.choice([[], "x", 3, None, [header]]), 0
    elif kind == 8:
        return header, rng.choice([-8, -1, 1, 7, 64])  # data area shorter or longer than the tensors
    elif kind == 9:  # overlapping / gapped offsets
        shift = rng.choice([-8, -2, 2, 8])
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin + shift, end + shift]
    elif kind == 10:  # shape product that overflows 64 bits, with or without a zero
        header[name]["shape"] = rng.choice([[2 ** 32, 2 ** 32, 0], [0, 2 ** 32, 2 ** 32], [2 ** 63, 2],
                                            [2 ** 62, 4, 0], [2 ** 64 - 1, 0], [2 ** 61, 8], [2 ** 61, 0, 8]])
        header[name]["data_offsets"] = [header[name]["data_offsets"][0]] * 2
    elif kind == 11:
        header[name]["extra"] = rng.choice(WEIRD_VALUES)
    elif kind == 12:
        del header[name][rng.choice(["dtype", "shape", "data_offsets"])]
    else:
        return header, 0
    return header, 0


def _file(tmp: Path, i: int, value, delta: int, rng: random.Random) -> Path:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=rng.random() < 0.5)
    raw = text.encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)
    data_len = 40 + delta
    prefix = struct.pack("<Q", len(raw))
    if rng.random() < 0.05:  # a length prefix that lies
        prefix = struct.pack("<Q", len(raw) + rng.choice([-1, 1, 2 ** 40, 2 ** 63]) & (2 ** 64 - 1))
    path = tmp / f"case{i:03d}.safetensors"
    path.write_bytes(prefix + raw + bytes(range(256))[:max(data_len, 0)].ljust(max(data_len, 0), b"\x01"))
    return path


def _safetensors_view(path: Path):
    """What safetensors itself reads from the file: {name: (dtype, shape)}, or None if it refuses."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            out = {}
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = (sl.get_dtype(), tuple(sl.get_shape()))
            return out
    except Exception:  # noqa: BLE001 - any refusal counts as a refusal
        return None


def _rewrite_and_open(header, source: Path, folder: Path) -> str | None:
    """Write the accepted tensors with ckptops' own writer (as sanitize would) and open the result
    with safetensors; returns the problem, or None."""
    from safetensors import safe_open

    from ckptops.checkpoint.writer import OutShard, OutTensor, ShardWriter

    folder.mkdir()
    shard = OutShard("model.safetensors", [OutTensor(t.name, t.dtype, t.shape) for t in header.tensors])
    writer = ShardWriter(folder, [shard], {"format": "pt"}, direct=False)
    data = source.read_bytes()
    try:
        for t in header.tensors:
            if t.nbytes:
                writer.write(t.name, 0, data[t.offset:t.offset + t.nbytes])
        writer.finish()
    finally:
        writer.close()
    try:
        with safe_open(str(folder / "model.safetensors"), "np") as f:
            if sorted(f.keys()) != sorted(t.name for t in header.tensors):
                return "tensor names differ"
    except Exception as exc:  # noqa: BLE001
        return str(exc)
    return None


def test_header_fuzz_agrees_with_safetensors(tmp_path):
    rng = random.Random(20261128)
    disagreements = []
    accepted = 0
    for i in range(CASES):
        value, delta = _mutate(rng, _valid_header())
        if rng.random() < 0.3:  # two mutations at once
            if isinstance(value, dict):
                value, delta2 = _mutate(rng, value) if any(k != "__metadata__" for k in value) else (value, 0)
                delta += delta2
        path = _file(tmp_path, i, value, delta, rng)
        theirs = _safetensors_view(path)
        try:
            header = read_header(path)
            ours = {t.name: (t.dtype, t.shape) for t in header.tensors}
        except CkptopsError as exc:
            message = str(exc)
            assert "\n" not in message and message.startswith(str(path)), message
            message.encode("utf-8")  # printable: no lone surrogate reaches the terminal
            ours = None
        except Exception as exc:  # noqa: BLE001
            disagreements.append(f"case {i}: {type(exc).__name__}: {exc!s:.200} (not a CkptopsError)")
            continue
        if ours is not None:
            accepted += 1
            if theirs is None:
                disagreements.append(f"case {i}: ckptops accepted what safetensors refuses: {path.read_bytes()[8:]!r}")
            else:
                # safetensors 0.8 reports dtypes in its own spelling; compare names and shapes
                if {k: v[1] for k, v in ours.items()} != {k: v[1] for k, v in theirs.items()}:
                    disagreements.append(f"case {i}: tensors differ: {ours} vs {theirs}")
                problem = _rewrite_and_open(header, path, tmp_path / f"out{i:03d}")
                if problem:
                    disagreements.append(f"case {i}: the output ckptops writes from it does not load: {problem}")
    assert not disagreements, "\n".join(disagreements[:20])
    assert accepted >= 20, f"only {accepted} mutations were accepted: the fuzzer tests too little"


@pytest.mark.parametrize("case", ["deep", "dtype_list", "surrogate_name", "overflow_zero", "metadata_list"])
def test_hostile_header_through_cli_is_one_line(tmp_path, case):
    """Through ``ckptops inspect``: exit 1, one ``error: <file>: ...`` line, no traceback."""
    from click.testing import CliRunner

    from ckptops.cli import main

    header = _valid_header()
    if case == "deep":
        text = '{"x":' + "[" * 100000 + "]" * 100000 + "}"
    else:
        if case == "dtype_list":
            header["a"]["dtype"] = ["F32"]
        elif case == "surrogate_name":
            header["\ud800"] = header.pop("a")
        elif case == "overflow_zero":
            header["d"]["shape"] = [2 ** 32, 2 ** 32, 0]
        elif case == "metadata_list":
            header["__metadata__"] = ["format", "pt"]
        text = json.dumps(header)
    path = _file(tmp_path, 0, text, 0, random.Random(1))
    assert _safetensors_view(path) is None  # safetensors refuses these too
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), result.output
    assert "Traceback" not in result.output
