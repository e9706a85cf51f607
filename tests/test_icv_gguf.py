"""GGUF control-vector export, read back with gguf's own reader."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from ckptops.errors import ICVError, MissingExtraError, OutputError, UsageError
from ckptops.icv.file import ICV
from ckptops.icv.gguf_export import export_gguf


NORMS = {0: 3.0, 1: 0.5, 2: 2.0, 3: 7.25}


def _icv(layers=(0, 1, 2, 3), **kw) -> ICV:
    generator = torch.Generator().manual_seed(7)
    kw.setdefault("mlp_norms", {i: NORMS[i] for i in layers})
    return ICV(vectors={i: torch.randn(24, generator=generator) for i in layers}, hidden_size=24, num_layers=4,
               model_type="mistral", **kw)


def _additive_reference(vector: torch.Tensor, alpha: float, norm: float) -> np.ndarray:
    """u = 0.1 * alpha * m * v / |v|, in float64 numpy (the documented additive rule)."""
    v = vector.numpy().astype(np.float64)
    return (0.1 * alpha * norm * v / np.sqrt((v * v).sum())).astype(np.float32)


def _read(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields, tensors, types


def test_export_reads_back_as_a_llama_cpp_control_vector(tmp_path):
    icv = _icv()
    with pytest.warns(UserWarning, match="layer 0"):
        result = export_gguf(icv, tmp_path / "control.gguf")
    fields, tensors, types = _read(tmp_path / "control.gguf")
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "mistral"
    assert fields["controlvector.layer_count"] == 3
    assert set(tensors) == {"direction.1", "direction.2", "direction.3"}  # llama.cpp rejects direction.0
    assert set(types.values()) == {"F32"}
    for i in (1, 2, 3):
        assert tensors[f"direction.{i}"].shape == (24,)
        expected = _additive_reference(icv.vectors[i], 0.12, NORMS[i])  # the official file, run additively
        np.testing.assert_allclose(tensors[f"direction.{i}"], expected, rtol=1e-6, atol=0)
    assert result.layers == [1, 2, 3] and result.dropped_layers == [0] and result.source_rule == "official"


def test_alpha_and_hint_overrides(tmp_path):
    icv = _icv(layers=(2, 3), rule="additive")
    result = export_gguf(icv, tmp_path / "c.gguf", alpha=1.5, model_hint="Mistral")
    fields, tensors, _ = _read(tmp_path / "c.gguf")
    assert fields["controlvector.model_hint"] == "Mistral" and fields["controlvector.layer_count"] == 2
    np.testing.assert_allclose(tensors["direction.3"], _additive_reference(icv.vectors[3], 1.5, NORMS[3]), rtol=1e-6)
    assert result.dropped_layers == []


def test_a_hint_naming_another_model_is_refused(tmp_path):
    with pytest.raises(UsageError, match=r"--model-hint 'qwen2' does not match .*mistral"):
        export_gguf(_icv(layers=(2, 3)), tmp_path / "c.gguf", model_hint="qwen2")
    assert not (tmp_path / "c.gguf").exists()
    export_gguf(_icv(layers=(2, 3)), tmp_path / "c.gguf", model_hint="llama")  # llama.cpp's name for Mistral


def test_a_refused_hint_cuts_a_long_recorded_model_type_and_source(tmp_path):
    icv = _icv(layers=(2, 3))
    icv = ICV(vectors=icv.vectors, hidden_size=24, num_layers=4, mlp_norms=icv.mlp_norms, model_type="t" * 5000,
              source="s" * 5000)
    with pytest.raises(UsageError, match=r"computed on: t{40}\.\.\. \(s{40}\.\.\.\), hidden size 24") as info:
        export_gguf(icv, tmp_path / "c.gguf", model_hint="qwen2")
    assert len(str(info.value)) < 400


def test_a_file_without_mlp_norms_is_refused(tmp_path):
    with pytest.raises(ICVError, match=r"--rule additive"):
        export_gguf(_icv(layers=(2, 3), mlp_norms={}), tmp_path / "c.gguf")


def test_printed_flags_follow_llama_cpp_syntax_and_the_file_layers(tmp_path):
    result = export_gguf(_icv(layers=(2, 3)), tmp_path / "c.gguf")
    command = result.commands("m.gguf")["llama-server"].split()
    assert command[:3] == ["llama-server", "-m", "m.gguf"]
    # llama.cpp's arg.cpp: --control-vector-scaled takes ONE argument FNAME:SCALE
    i = command.index("--control-vector-scaled")
    assert command[i + 1] == f"{tmp_path / 'c.gguf'}:1"
    j = command.index("--control-vector-layer-range")
    assert command[j + 1:j + 3] == ["2", "3"]  # direction.N is added to 0-based layer N's output


def test_refusals(tmp_path):
    with pytest.warns(UserWarning), pytest.raises(ICVError, match="cannot steer layer 0"):
        export_gguf(_icv(layers=(0,)), tmp_path / "c.gguf")
    export_gguf(_icv(layers=(1,)), tmp_path / "c.gguf")
    with pytest.raises(OutputError, match="already exists"):
        export_gguf(_icv(layers=(1,)), tmp_path / "c.gguf")
    export_gguf(_icv(layers=(1,)), tmp_path / "c.gguf", overwrite=True)
    nameless = ICV(vectors={1: torch.ones(4)}, hidden_size=4, num_layers=2, mlp_norms={1: 1.0})
    with pytest.raises(ICVError, match="--model-hint"):
        export_gguf(nameless, tmp_path / "d.gguf")


def test_missing_gguf_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(MissingExtraError, match=r"pip install -e '\.\[icv\]'"):
        export_gguf(_icv(layers=(1,)), tmp_path / "c.gguf")


def _one_line_error(result, *fragments):
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_the_input_icv_is_never_replaced_even_with_overwrite(tmp_path):
    from click.testing import CliRunner

    from ckptops.cli import main

    source = _icv().save(tmp_path / "icv.safetensors")
    original = source.read_bytes()
    (tmp_path / "link.safetensors").symlink_to(source)
    (tmp_path / "hard.safetensors").hardlink_to(source)
    for out in (source, tmp_path / "sub" / ".." / "icv.safetensors", tmp_path / "link.safetensors",
                tmp_path / "hard.safetensors"):
        result = CliRunner().invoke(main, ["icv", "export-gguf", str(source), str(out), "--overwrite"])
        _one_line_error(result, "is the input ICV file")
    result = CliRunner().invoke(main, ["icv", "export-gguf", str(tmp_path / "link.safetensors"), str(source),
                                       "--overwrite"])
    _one_line_error(result, "is the input ICV file")
    assert source.read_bytes() == original
    with pytest.raises(OutputError, match="is the input ICV file"):
        export_gguf(source, source, overwrite=True)
    assert source.read_bytes() == original


def test_an_existing_out_is_refused_before_any_work_in_one_line(tmp_path):
    from click.testing import CliRunner

    from ckptops.cli import main

    source = _icv().save(tmp_path / "icv.safetensors")  # holds layer 0: exporting would warn
    existing = tmp_path / "c.gguf"
    existing.write_bytes(b"keep me")
    result = CliRunner().invoke(main, ["icv", "export-gguf", str(source), str(existing)])
    _one_line_error(result, "c.gguf: already exists", "--overwrite")
    assert existing.read_bytes() == b"keep me"
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not an ICV")
    with pytest.raises(OutputError, match="already exists"):  # OUT is checked before the ICV is read
        export_gguf(garbage, existing)
