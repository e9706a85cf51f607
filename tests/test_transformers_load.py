"""The output folder loads in stock transformers with no missing or unexpected weights."""

from __future__ import annotations

import pytest
import torch

import ckptops
from hdr_reference import load_folder

transformers = pytest.importorskip("transformers")


def test_output_loads_in_transformers(triple, tmp_path):
    paths, _ = triple
    out = tmp_path / "out"
    ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], out, progress=False)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    saved = load_folder(out)
    params = dict(model.named_parameters())
    assert torch.equal(params["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16), saved["model.layers.0.mlp.up_proj.weight"])
    logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert torch.isfinite(logits).all()
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "- safety-arithmetic" in card and "- ckptops" in card
    # a local target has no Hub id: no base_model key that would link some other Hub model
    assert "base_model:" not in card.split("\n---\n")[0]


def test_float32_output_updates_config(triple, tmp_path):
    import json

    paths, _ = triple
    out = tmp_path / "out"
    ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], out, dtype="float32", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.float32
