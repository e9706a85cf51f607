"""SanitizeOptions: validated once; the card, ckptops.json and a recipe all come from it."""

from __future__ import annotations

import json

import pytest

import ckptops
from ckptops.errors import UsageError
from ckptops.hdr.options import SanitizeOptions
from ckptops.recipe import dump_toml, validate


def test_normalises_loose_inputs():
    options = SanitizeOptions(layers="1-2", max_memory="512MiB", shard_size="5GB", dtype=None, exclude=["norm"])
    assert options.layers == frozenset({1, 2})
    assert options.max_memory == 512 << 20 and options.shard_size == 5 * 10**9
    assert options.dtype == "auto" and options.out_code is None and options.exclude == ("norm",)
    assert SanitizeOptions(dtype="bfloat16").out_code == "BF16"


@pytest.mark.parametrize("bad, says", [
    ({"top_k": 0}, "--top-k"), ({"top_k": 1.5}, "--top-k"), ({"top_k": True}, "--top-k"),
    ({"scale": float("nan")}, "--scale"), ({"scope": "model"}, "--scope"), ({"dtype": "int8"}, "--dtype"),
    ({"layers": "3-1"}, "--layers"), ({"max_memory": "lots"}, "--max-memory"), ({"max_memory": "100MiB"}, "--max-memory"),
    ({"edit_area": "manual"}, "--edit-area"), ({"edit_area": "auto", "layers": "1"}, "--layers or --edit-area"),
    ({"private": True}, "--push-to-hub"),
])
def test_bad_values_name_the_option(bad, says):
    with pytest.raises(UsageError, match=says.replace("-", r"\-")):
        SanitizeOptions(**bad)


def test_recipe_section_round_trips():
    options = SanitizeOptions(top_k=0.05, scale=2.5, scope="layer", exclude=("lm_head",), layers="0-1",
                              dtype="float32", max_memory="700MiB", shard_size="1GB")
    recipe = validate({"models": {"base": "b", "harmful": "h", "target": "t"}, "hdr": options.to_recipe(),
                       "output": {"out": "o"}})
    # through TOML text too, as a recipe file is read back
    import tomllib

    again = validate(tomllib.loads(dump_toml(recipe.data)))
    assert SanitizeOptions.from_recipe(again["hdr"]) == options


def test_written_parameters_are_the_options_parameters(triple, tmp_path):
    paths, _ = triple
    options = SanitizeOptions(top_k=0.2, scale=2.0, scope="tensor", exclude=("norm",), progress=False)
    report = ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], tmp_path / "out", options=options)
    provenance = json.loads((tmp_path / "out" / "ckptops.json").read_text())
    assert provenance["parameters"] == report.parameters == options.to_parameters()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "top_k: 0.2" in card and "scope: tensor" in card


def test_options_and_keywords_are_not_mixed(triple, tmp_path):
    paths, _ = triple
    with pytest.raises(TypeError):
        ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], tmp_path / "o",
                         options=SanitizeOptions(), top_k=0.1)
    with pytest.raises(TypeError):
        ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], tmp_path / "o", top_kk=0.1)
