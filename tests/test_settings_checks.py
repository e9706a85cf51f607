"""Silent no-ops and harmful settings are named before work (issue classes 10 and 11).

Each case runs the CLI on a tiny triple and checks the exit code, the single error or warning
line, and that OUT was not created for refusals. ``--scale 0`` must report the tensors that really
changed: compared here with the target's bytes, read independently with safetensors.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ckptops.cli import main
from conftest import CONFIG, llama_state, write_folder


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    root = tmp_path_factory.mktemp("settings")
    base = llama_state(0)
    harmful = llama_state(1, base=base, delta=0.01)
    target = llama_state(2, base=base, delta=0.01)
    paths = {}
    for role, state in (("base", base), ("harmful", harmful), ("target", target)):
        paths[role] = write_folder(root / role, state)
        (root / role / "config.json").write_text(json.dumps(CONFIG))
    return paths


def _sanitize(triple, out, *extra, harmful=None):
    return CliRunner().invoke(main, ["sanitize", "--base", str(triple["base"]),
                                     "--harmful", str(harmful or triple["harmful"]),
                                     "--target", str(triple["target"]), "--out", str(out), "-q", *extra])


@pytest.mark.parametrize("extra,expected", [
    (("--scale", "-1"), "ADDS the harm vector"),
    (("--layers", ""), "names no layer"),
    (("--layers", "1-7"), "has 3 decoder layers"),
    (("--layers", "0-100000000"), "beyond any model"),
])
def test_harmful_or_empty_settings_are_refused_before_work(triple, tmp_path, extra, expected):
    out = tmp_path / "out"
    result = _sanitize(triple, out, *extra)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert not out.exists() and not list(tmp_path.glob(".out.ckptops-*"))


def test_harmful_same_as_base_is_refused(triple, tmp_path):
    result = _sanitize(triple, tmp_path / "out", harmful=triple["base"])
    assert result.exit_code == 2 and "is the same checkpoint as --base" in result.output


@pytest.mark.parametrize("extra,expected", [
    (("--exclude", "no_such_tensor_xyz"), "matches no tensor"),
    (("--scale", "40"), "far beyond the paper's 3"),
])
def test_suspicious_settings_warn_and_still_run(triple, tmp_path, extra, expected):
    result = _sanitize(triple, tmp_path / "out", *extra)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    assert sum(expected in w for w in warnings) == 1, result.output


def test_scale_zero_reports_what_actually_changed(triple, tmp_path):
    out = tmp_path / "out"
    result = _sanitize(triple, out, "--scale", "0", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    written = load_file(str(out / "model.safetensors"))
    original = load_file(str(triple["target"] / "model.safetensors"))
    really_changed = sum(1 for name in written if not torch.equal(written[name], original[name]))
    assert really_changed == 0
    assert report["tensors_changed"] == really_changed
    assert "nothing will change" in result.output


def test_harmful_identical_copy_of_base_warns_after_the_run(triple, tmp_path):
    import shutil

    copy = tmp_path / "harmful-copy"
    shutil.copytree(triple["base"], copy)
    result = _sanitize(triple, tmp_path / "out", "--json", harmful=copy)
    assert result.exit_code == 0, result.output
    assert "identical to --base" in result.output
    assert "the harmful model equals the base in every counted tensor (tau = 0)" in result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["tensors_changed"] == 0


@pytest.mark.parametrize("pattern", [".*", ""])
def test_excluding_every_tensor_is_named_as_the_cause_not_tau_zero(triple, tmp_path, pattern):
    out = tmp_path / "out"
    result = _sanitize(triple, out, "--exclude", pattern)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    total = len(load_file(str(triple["target"] / "model.safetensors")))
    assert len(warnings) == 1 and f"--exclude excludes every tensor HDR could change ({total} of {total})" in warnings[0]
    assert "tau = 0" not in result.output and "equals the base" not in result.output
    written, original = load_file(str(out / "model.safetensors")), load_file(str(triple["target"] / "model.safetensors"))
    assert all(torch.equal(written[name], original[name]) for name in original)  # the output copies the target


def test_late_validation_happens_before_any_model_loads(triple, tmp_path, monkeypatch):
    """--icv-alpha -1, --layers beyond the model, --device cuda without CUDA: refused before load."""
    import ckptops.icv.load as load_module

    monkeypatch.setattr(load_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    runner = CliRunner()
    model = str(triple["target"])
    cases = [
        (["eval", "--model", model, "--prompts", str(prompts), "--label", "harmful", "--device", "cuda"], "no CUDA"),
        (["eval", "--model", model, "--prompts", str(prompts), "--label", "harmful", "--icv-alpha", "-1"], "alpha"),
        (["icv", "compute", "--model", model, "--out", str(tmp_path / "i.safetensors"), "--layers", "40-45"],
         "has 3 decoder layers"),
        (["icv", "compute", "--model", model, "--out", str(tmp_path / "i.safetensors"), "--alpha", "-1"], "alpha"),
        (["generate", "--model", model, "--no-icv", "--prompt", "x\ud800"], "'x\\ud800' is not valid Unicode"),
    ]
    for args, expected in cases:
        result = runner.invoke(main, args + ["--threads", "1"])
        lines = result.output.strip().splitlines()
        assert result.exit_code in (1, 2), (args, result.output, result.exception)
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (args, result.output)


def test_icv_strength_must_be_finite(tmp_path):
    """alpha 1e308 in the file, or alpha x scale factor overflowing: refused; beyond the sane range: warned."""
    import warnings

    from ckptops.errors import ICVError
    from ckptops.icv.file import ICV, check_strength, load_icv

    vectors = {0: torch.ones(8), 1: torch.full((8,), 2.0)}
    for alpha in (1e308, 1e40):
        path = tmp_path / f"icv-{alpha:g}.safetensors"
        ICV(vectors=vectors, hidden_size=8, num_layers=2, alpha=alpha).save(path)
        with pytest.raises(ICVError, match="finite|overflows"):
            check_strength(load_icv(path), str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_strength(ICV(vectors=vectors, hidden_size=8, num_layers=2, alpha=5.0))
        assert any("dominate" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_strength(ICV(vectors=vectors, hidden_size=8, num_layers=2, alpha=0.12)) == pytest.approx(0.012)


def test_recipe_alpha_and_layer_range_are_checked_on_load(tmp_path, triple):
    from ckptops.errors import RecipeError
    from ckptops.recipe import load_recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[models]\nbase = "{triple["base"]}"\nharmful = "{triple["harmful"]}"\n'
                      f'target = "{triple["target"]}"\n[output]\nout = "{tmp_path / "o"}"\n')
    for override, expected in (("icv.alpha=-1", "icv.alpha must be a finite number >= 0"),
                               ('hdr.layers="0-100000000"', "beyond any model")):
        with pytest.raises(RecipeError, match=expected):
            load_recipe(recipe, [override])
