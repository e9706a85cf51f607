"""The icv.safetensors format: round trip, metadata, and every refusal a loader owes the user."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from ckptops.errors import ICVError, OutputError
from ckptops.icv.file import ICV, load_icv

REQUIRED_KEYS = {"format", "format_version", "rule", "site", "alpha", "scale_factor", "strength", "sign_convention",
                 "method", "positions", "num_demos", "demos_sha256", "model_type", "hidden_size", "num_layers",
                 "source", "source_sha256"}


def _icv(**kw) -> ICV:
    generator = torch.Generator().manual_seed(0)
    defaults = dict(vectors={1: torch.randn(16, generator=generator), 3: torch.randn(16, generator=generator)},
                    hidden_size=16, num_layers=4, num_demos=30, demos_sha256="ab" * 32, model_type="llama",
                    source="some/folder", source_sha256="cd" * 32)
    defaults.update(kw)
    return ICV(**defaults)


def _read_header(path) -> dict:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length])


def test_round_trip_is_exact(tmp_path):
    icv = _icv(rule="paper", alpha=0.5, scale_factor=1.0, method="pc1", positions="last")
    path = icv.save(tmp_path / "icv.safetensors")
    loaded = load_icv(path)
    assert loaded.layers == [1, 3]
    for i in icv.layers:
        assert torch.equal(loaded.vectors[i], icv.vectors[i])
    for field in ("hidden_size", "num_layers", "rule", "alpha", "scale_factor", "method", "positions", "num_demos",
                  "demos_sha256", "model_type", "source", "source_sha256"):
        assert getattr(loaded, field) == getattr(icv, field), field
    assert loaded.site == "residual" and loaded.strength == 0.5


def test_file_layout_and_metadata(tmp_path):
    path = _icv().save(tmp_path / "icv.safetensors")
    header = _read_header(path)  # read with plain json, not through ckptops
    meta = header.pop("__metadata__")
    assert set(header) == {"icv.layers.1", "icv.layers.3"}
    assert all(t["dtype"] == "F32" and t["shape"] == [16] for t in header.values())
    assert REQUIRED_KEYS <= set(meta)
    assert meta["format"] == "ckptops-icv" and meta["format_version"] == "1"
    assert meta["rule"] == "official" and meta["site"] == "mlp_output"
    assert float(meta["alpha"]) == 0.12 and float(meta["scale_factor"]) == 0.1
    assert float(meta["strength"]) == pytest.approx(0.012)
    assert meta["sign_convention"].startswith("toward_safe")
    assert (meta["hidden_size"], meta["num_layers"], meta["num_demos"]) == ("16", "4", "30")
    assert path.stat().st_size < 4096  # kilobytes, as promised


def _write(path, tensors, **meta_overrides):
    meta = _icv().metadata()
    meta.update(meta_overrides)
    meta = {k: v for k, v in meta.items() if v is not None}
    save_file(tensors, str(path), metadata=meta)
    return path


GOOD = {"icv.layers.1": torch.zeros(16), "icv.layers.3": torch.ones(16)}


@pytest.mark.parametrize("tensors,meta,message", [
    (GOOD, {"format_version": "3"}, r"unknown ICV format version '3'.*reads versions 1, 2"),
    (GOOD, {"format": None}, r"not a ckptops ICV file"),
    (GOOD, {"format": "something-else"}, r"not a ckptops ICV file"),
    (GOOD, {"rule": "sideways"}, r"unknown rule 'sideways'"),
    (GOOD, {"site": "residual"}, r"site 'residual' does not match rule 'official'"),
    (GOOD, {"hidden_size": "sixteen"}, r"hidden_size='sixteen' is not an integer"),
    (GOOD, {"num_layers": None}, r"lacks 'num_layers'"),
    (GOOD, {"alpha": "-1"}, r"alpha='-1' must be a finite number"),
    (GOOD, {"method": "pc7"}, r"unknown method 'pc7'"),
    ({"icv.layers.1": torch.zeros(16, dtype=torch.float16)}, {}, r"icv.layers.1 is float16, expected float32"),
    ({"icv.layers.1": torch.zeros(8)}, {}, r"icv.layers.1 has shape \[8\], expected \[16\]"),
    ({"icv.layers.1": torch.zeros(2, 8)}, {}, r"icv.layers.1 has shape \[2, 8\]"),
    ({"icv.layers.4": torch.zeros(16)}, {}, r"icv.layers.4 is outside the model's 4 layers"),
    ({"icv.layers.1": torch.full((16,), float("nan"))}, {}, r"NaN or Inf"),
    ({"icv.layers.1": torch.zeros(16), "model.embed": torch.zeros(16)}, {}, r"unexpected tensor 'model.embed'"),
    ({"icv.layers.01": torch.zeros(16)}, {}, r"unexpected tensor 'icv.layers.01'"),
    ({}, {}, r"holds no layer vectors"),
])
def test_bad_files_are_refused_with_the_file_named(tmp_path, tensors, meta, message):
    path = _write(tmp_path / "bad.safetensors", tensors, **meta)
    with pytest.raises(ICVError, match=message) as info:
        load_icv(path)
    text = str(info.value)
    assert str(path) in text and "\n" not in text


LONG = 5000


@pytest.mark.parametrize("tensors,meta,start", [
    (GOOD, {"hidden_size": "9" * LONG}, "metadata hidden_size='99999"),         # over int()'s digit limit
    (GOOD, {"hidden_size": "9" * 1000}, "metadata hidden_size=99999"),          # parses, absurdly large
    (GOOD, {"num_layers": "7" * 1000}, "metadata num_layers=77777"),
    (GOOD, {"num_demos": "1" * 1000}, "metadata num_demos=11111"),
    (GOOD, {"alpha": "x" * LONG}, "metadata alpha='xxxxx"),
    (GOOD, {"rule": "r" * LONG}, "unknown rule 'rrrrr"),
    (GOOD, {"site": "s" * LONG}, "site 'sssss"),
    (GOOD, {"method": "m" * LONG}, "unknown method 'mmmmm"),
    (GOOD, {"positions": "p" * LONG}, "unknown positions 'ppppp"),
    (GOOD, {"format_version": "7" * LONG}, "unknown ICV format version '77777"),
    (GOOD, {"format": "f" * LONG}, "not a ckptops ICV file (metadata 'format' is 'fffff"),
    (GOOD, {"mlp_output_norms": json.dumps({"9" * 1000: -1.0})}, "mlp_output_norms holds a negative"),
    ({"icv.layers.1": torch.zeros(16), "n" * LONG: torch.zeros(16)}, {}, "unexpected tensor 'nnnnn"),
])
def test_long_metadata_values_are_cut_short_in_the_error(tmp_path, tensors, meta, start):
    path = _write(tmp_path / "bad.safetensors", tensors, **meta)
    with pytest.raises(ICVError) as info:
        load_icv(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and start in text and "\n" not in text
    assert len(text) < len(str(path)) + 200, text  # the value is cut to a few dozen characters
    assert "..." in text


def test_not_safetensors_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(ICVError, match="not a readable safetensors file"):
        load_icv(garbage)
    with pytest.raises(ICVError, match="no such ICV file"):
        load_icv(tmp_path / "missing.safetensors")
    with pytest.raises(ICVError, match="not a file"):
        load_icv(tmp_path)
    with pytest.raises(ICVError, match="/dev/zero: not a regular file"):  # it exists: not "no such file"
        load_icv("/dev/zero")


def test_check_fits_names_both_shapes():
    icv = _icv()
    icv.check_fits(16, 4)
    with pytest.raises(ICVError) as info:
        icv.check_fits(32, 4, "the model")
    assert "hidden size 16 and 4 layers" in str(info.value) and "hidden size 32 and 4 layers" in str(info.value)
    with pytest.raises(ICVError, match="hidden size 16 and 6 layers"):
        icv.check_fits(16, 6)


def test_save_refuses_bad_vectors_and_existing_files(tmp_path):
    with pytest.raises(ICVError, match="shape"):
        _icv(vectors={0: torch.zeros(3)}).save(tmp_path / "x.safetensors")
    with pytest.raises(ICVError, match="float64"):
        _icv(vectors={0: torch.zeros(16, dtype=torch.float64)}).save(tmp_path / "x.safetensors")
    path = _icv().save(tmp_path / "icv.safetensors")
    with pytest.raises(OutputError, match="already exists"):
        _icv().save(path, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["icv.safetensors"]  # no temporary files left


def test_unknown_metadata_survives_a_round_trip(tmp_path):
    path = _icv(extra={"note": "computed after HDR"}).save(tmp_path / "icv.safetensors")
    again = load_icv(load_icv(path).save(tmp_path / "copy.safetensors"))
    assert again.extra["note"] == "computed after HDR"
    assert again.extra["created_by"].startswith("ckptops ")
