"""GGUF control-vector export, read back with gguf's own reader."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from ckptops.errors import ICVError, MissingExtraError, OutputError
from ckptops.icv.file import ICV
from ckptops.icv.gguf_export import export_gguf


def _icv(layers=(0, 1, 2, 3), **kw) -> ICV:
    generator = torch.Generator().manual_seed(7)
    return ICV(vectors={i: torch.randn(24, generator=generator) for i in layers}, hidden_size=24, num_layers=4,
               model_type="mistral", **kw)


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
        expected = (icv.vectors[i].numpy().astype(np.float64) * 0.12).astype(np.float32)  # alpha * v, paper rule
        np.testing.assert_array_equal(tensors[f"direction.{i}"], expected)
    assert result.layers == [1, 2, 3] and result.dropped_layers == [0]


def test_alpha_and_hint_overrides(tmp_path):
    icv = _icv(layers=(2, 3))
    result = export_gguf(icv, tmp_path / "c.gguf", alpha=1.5, model_hint="llama")
    fields, tensors, _ = _read(tmp_path / "c.gguf")
    assert fields["controlvector.model_hint"] == "llama" and fields["controlvector.layer_count"] == 2
    np.testing.assert_allclose(tensors["direction.3"], icv.vectors[3].numpy() * 1.5, rtol=1e-6)
    assert result.dropped_layers == []


def test_refusals(tmp_path):
    with pytest.warns(UserWarning), pytest.raises(ICVError, match="cannot steer layer 0"):
        export_gguf(_icv(layers=(0,)), tmp_path / "c.gguf")
    export_gguf(_icv(layers=(1,)), tmp_path / "c.gguf")
    with pytest.raises(OutputError, match="already exists"):
        export_gguf(_icv(layers=(1,)), tmp_path / "c.gguf")
    export_gguf(_icv(layers=(1,)), tmp_path / "c.gguf", overwrite=True)
    nameless = ICV(vectors={1: torch.ones(4)}, hidden_size=4, num_layers=2)
    with pytest.raises(ICVError, match="--model-hint"):
        export_gguf(nameless, tmp_path / "d.gguf")


def test_missing_gguf_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'ckptops\[icv\]'"):
        export_gguf(_icv(layers=(1,)), tmp_path / "c.gguf")
