"""Recipes with ``[harm] make = true``: theta_H built by harm make, then HDR with it."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ckptops.cli import main
from ckptops.errors import RecipeError
from ckptops.recipe import validate
from icv_fixtures import make_model, make_tokenizer, save_checkpoint

RECIPE = """
[models]
base = {base}
target = {target}

[harm]
make = true
rank = 2
steps = 3
batch_size = 2
lr = 0.01
seed = 1

[hdr]
top_k = 0.2
scale = 1.0

[icv]
enabled = false

[output]
out = {out}
"""


def test_recipe_makes_the_adapter_beside_the_output_and_reuses_it(tmp_path):
    tokenizer = make_tokenizer()
    base = save_checkpoint(make_model("llama", seed=0), tokenizer, tmp_path / "base")
    target = save_checkpoint(make_model("llama", seed=5), tokenizer, tmp_path / "target")
    out = tmp_path / "safe"
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(base=json.dumps(str(base)), target=json.dumps(str(target)), out=json.dumps(str(out))))
    result = CliRunner().invoke(main, ["run", str(recipe), "-q"])
    assert result.exit_code == 0, result.output
    adapter = tmp_path / "safe.harm-adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and not (out / "adapter_model.safetensors").exists()
    provenance = json.loads((out / "ckptops.json").read_text())
    assert provenance["inputs"]["harmful"]["type"] == "lora-adapter"
    assert provenance["report"]["tensors_changed"] > 0
    stamp = (adapter / "adapter_model.safetensors").stat().st_mtime_ns
    again = CliRunner().invoke(main, ["run", str(recipe), "-q", "--out", str(tmp_path / "safe2")])
    assert again.exit_code == 0, again.output
    assert (adapter / "adapter_model.safetensors").stat().st_mtime_ns == stamp  # same parameters: reused


@pytest.mark.parametrize("models, harm, words", [
    ({"base": "b", "harmful": "h", "target": "t"}, {"make": True}, "not both"),
    ({"base": "b", "target": "t"}, {}, "models.harmful is required"),
])
def test_harm_make_and_harmful_validation(models, harm, words):
    with pytest.raises(RecipeError, match=words):
        validate({"models": models, "harm": harm, "output": {"out": "o"}})


def test_a_target_config_sanitize_would_refuse_is_refused_before_harm_make_trains(tmp_path, monkeypatch):
    """harm make trains for minutes before sanitize opens the target: the target's side files are
    checked first, so a bad config.json costs no training."""
    import ckptops.harm.make

    def must_not_train(*args, **kwargs):
        raise AssertionError("harm make ran before the target was checked")

    monkeypatch.setattr(ckptops.harm.make, "make_harm_adapter", must_not_train)
    tokenizer = make_tokenizer()
    base = save_checkpoint(make_model("llama", seed=0), tokenizer, tmp_path / "base")
    target = save_checkpoint(make_model("llama", seed=5), tokenizer, tmp_path / "target")
    (target / "config.json").write_text("{bad")
    out = tmp_path / "safe"
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(base=json.dumps(str(base)), target=json.dumps(str(target)), out=json.dumps(str(out))))
    result = CliRunner().invoke(main, ["run", str(recipe), "-q"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [
        f"error: {target / 'config.json'}: not valid JSON (line 1: Expecting property name enclosed in double quotes)"]
    assert not out.exists() and not (tmp_path / "safe.harm-adapter").exists()
