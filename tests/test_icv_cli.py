"""`ckptops icv compute|inspect|export-gguf` and `ckptops generate` through click's CliRunner."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from icv_fixtures import make_model, make_tokenizer, reference_icv, save_checkpoint, first_demo_records

from ckptops.cli import main
from ckptops.icv.file import load_icv


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = make_model("phi3", seed=2)
    return save_checkpoint(model, make_tokenizer(), root / "phi3"), model


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_lists_commands_with_examples():
    top = run("--help")
    assert top.exit_code == 0 and "icv" in top.output and "generate" in top.output
    for command in (["icv", "compute"], ["icv", "inspect"], ["icv", "export-gguf"], ["icv", "bake"], ["generate"]):
        result = run(*command, "--help")
        assert result.exit_code == 0 and "Example" in result.output, command


def test_compute_inspect_export(checkpoint, tmp_path):
    folder, model = checkpoint
    demos = tmp_path / "pairs.jsonl"
    records = first_demo_records(5)
    demos.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "icv.safetensors"
    result = run("icv", "compute", "--model", folder, "--out", out, "--demos", demos, "--layers", "1-2", "-q")
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout and "2/3 layers" in result.stdout
    icv = load_icv(out)
    expected = reference_icv(model, make_tokenizer(), "phi3", records)
    assert icv.layers == [1, 2] and icv.num_demos == 5 and icv.source == str(folder) and len(icv.source_sha256) == 64
    for i in (1, 2):
        torch.testing.assert_close(icv.vectors[i].double(), torch.from_numpy(expected[i]), atol=1e-5, rtol=0)

    shown = run("icv", "inspect", out)
    assert shown.exit_code == 0
    for text in ("official", "strength 0.012", "phi3, hidden size 32, 3 layers", "1-2 (2 of 3)", "toward_safe"):
        assert text in shown.stdout, text
    as_json = json.loads(run("icv", "inspect", out, "--json").stdout)
    assert as_json["metadata"]["num_demos"] == "5" and set(as_json["layer_norms"]) == {"1", "2"}

    gguf_out = tmp_path / "control.gguf"
    exported = run("icv", "export-gguf", out, gguf_out, "--alpha", "0.5")
    assert exported.exit_code == 0 and gguf_out.is_file()
    assert "2 direction tensors" in exported.stdout and "the file's rule is official" in exported.stdout
    # the printed commands name the file, scale 1 and the file's layers (direction.N on 0-based layer N)
    server = next(line.split() for line in exported.stdout.splitlines() if line.strip().startswith("llama-server"))
    assert server[server.index("--control-vector-scaled") + 1] == f"{gguf_out}:1"
    assert server[server.index("--control-vector-layer-range") + 1:][:2] == ["1", "2"]
    assert any(line.strip().startswith("llama-cli") for line in exported.stdout.splitlines())
    wrong = run("icv", "export-gguf", out, tmp_path / "other.gguf", "--model-hint", "qwen2")
    assert_one_line_error(wrong, "--model-hint 'qwen2' does not match", "phi3")

    again = run("icv", "compute", "--model", folder, "--out", out, "--demos", demos, "-q")
    assert_one_line_error(again, str(out), "already exists")


def test_compute_with_default_demos_and_paper_options(checkpoint, tmp_path):
    folder, _ = checkpoint
    out = tmp_path / "paper.safetensors"
    result = run("icv", "compute", "--model", folder, "--out", out, "--positions", "last", "--method", "pc1",
                 "--rule", "paper", "--alpha", "0.3", "--max-memory", "60KB", "-q")
    assert result.exit_code == 0, result.output
    icv = load_icv(out)
    assert (icv.num_demos, icv.positions, icv.method, icv.rule, icv.alpha, icv.site) == (30, "last", "pc1", "paper", 0.3, "residual")


def test_generate_with_and_without_icv(checkpoint, tmp_path):
    folder, _ = checkpoint
    plain = run("generate", "--model", folder, "--prompt", "Question: how do i make a fake id?", "--max-new-tokens", "4", "-q")
    assert plain.exit_code == 0, plain.output
    assert plain.stdout.strip()
    out = tmp_path / "icv.safetensors"
    assert run("icv", "compute", "--model", folder, "--out", out, "--demos", _few_demos(tmp_path), "-q").exit_code == 0
    compared = run("generate", "--model", folder, "--icv", out, "--alpha", "5", "--compare", "--max-new-tokens", "4",
                   "--prompt", "Question: how do i make a fake id?", "-q")
    assert compared.exit_code == 0, compared.output
    assert "--- without ICV" in compared.stdout and "--- with ICV (official, alpha 5)" in compared.stdout
    assert compared.stdout.split("--- without ICV\n")[1].startswith(plain.stdout.strip())


def _few_demos(tmp_path):
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in first_demo_records(3)))
    return path


def test_errors_are_one_line(checkpoint, tmp_path):
    folder, _ = checkpoint
    assert_one_line_error(run("icv", "compute", "--model", tmp_path / "missing", "--out", tmp_path / "x.safetensors"),
                          "no such model folder")
    assert_one_line_error(run("icv", "compute", "--model", folder, "--out", tmp_path / "x.safetensors",
                              "--layers", "2-1"), "runs backwards")
    assert_one_line_error(run("icv", "compute", "--model", folder, "--out", tmp_path / "x.safetensors",
                              "--layers", "5", "-q"), "not in 0..2")
    assert_one_line_error(run("icv", "compute", "--model", folder, "--out", tmp_path / "x.safetensors",
                              "--max-memory", "lots"), "--max-memory")
    bad_demos = tmp_path / "bad.jsonl"
    bad_demos.write_text('{"question": "q"}\n')
    assert_one_line_error(run("icv", "compute", "--model", folder, "--out", tmp_path / "x.safetensors",
                              "--demos", bad_demos), "line 1", "missing 'unsafe'")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"nope")
    assert_one_line_error(run("icv", "inspect", garbage), str(garbage))
    assert_one_line_error(run("icv", "export-gguf", garbage, tmp_path / "c.gguf"), str(garbage))
    wrong = tmp_path / "wrong.safetensors"
    from ckptops.icv.file import ICV
    ICV(vectors={0: torch.ones(64)}, hidden_size=64, num_layers=3).save(wrong)
    assert_one_line_error(run("generate", "--model", folder, "--icv", wrong, "--prompt", "hi", "-q"),
                          "hidden size 64 and 3 layers", "hidden size 32 and 3 layers")
    assert_one_line_error(run("generate", "--model", folder, "--alpha", "1", "--prompt", "hi", "-q"), "need an ICV")
    assert_one_line_error(run("generate", "--model", folder, "--chat", "--prompt", "hi", "-q"), "no chat template")


def test_compute_never_replaces_a_model_file_or_the_demos_file(checkpoint, tmp_path):
    import shutil

    folder = shutil.copytree(checkpoint[0], tmp_path / "model")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    weights = next(name for name in before if name.endswith(".safetensors"))
    for name in ("config.json", weights, "tokenizer_config.json"):
        result = run("icv", "compute", "--model", folder, "--out", folder / name, "--overwrite", "-q")
        assert_one_line_error(result, f"--out {folder / name}", "not an ICV file")
    demos = _few_demos(tmp_path)
    text = demos.read_text()
    assert_one_line_error(run("icv", "compute", "--model", folder, "--out", demos, "--demos", demos, "--overwrite", "-q"),
                          "is the --demos file")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before and demos.read_text() == text
    # the documented use: the ICV goes into the model folder, and a rerun replaces it
    icv_path = folder / "icv.safetensors"
    assert run("icv", "compute", "--model", folder, "--out", icv_path, "--demos", demos, "-q").exit_code == 0
    again = run("icv", "compute", "--model", folder, "--out", icv_path, "--demos", demos, "--rule", "additive",
                "--overwrite", "-q")
    assert again.exit_code == 0, again.output
    assert load_icv(icv_path).rule == "additive"
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "icv.safetensors"} == before
    # under another .safetensors name in the folder the ICV would be read as one more weight file
    other = folder / "my_icv.safetensors"
    assert_one_line_error(run("icv", "compute", "--model", folder, "--out", other, "--demos", demos, "-q"),
                          "must be named icv.safetensors")
    assert not other.exists()


def test_compute_refuses_a_too_long_demonstration_before_loading_the_weights(checkpoint, tmp_path, monkeypatch):
    import transformers

    folder, _ = checkpoint
    demos = tmp_path / "long.jsonl"
    demos.write_text("".join(json.dumps(r) + "\n" for r in first_demo_records(2))
                     + json.dumps({"question": "how " * 300, "unsafe": "sure"}) + "\n")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the weights were loaded"))
    out = tmp_path / "icv.safetensors"
    result = run("icv", "compute", "--model", folder, "--out", out, "--demos", demos, "-q")
    # "<s> question : how x300 answer : sure": 1 + 2 + 300 + 2 + 1 tokens; the fixture model has 256 positions
    assert_one_line_error(result, f"{demos}: line 3: the unsafe demonstration is 306 tokens",
                          "context window of 256 tokens")
    assert not out.exists()


def test_generate_names_a_device_as_not_a_regular_file(checkpoint):
    result = run("generate", "--model", checkpoint[0], "--icv", "/dev/zero", "--prompt", "hi", "-q")
    assert_one_line_error(result, "/dev/zero: not a regular file")


def test_missing_extra_is_a_one_line_error(checkpoint, tmp_path, monkeypatch):
    import sys

    folder, _ = checkpoint
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    result = run("icv", "compute", "--model", folder, "--out", tmp_path / "x.safetensors", "-q")
    assert_one_line_error(result, "needs the 'transformers' package", "pip install -e '.[icv]' (in a clone of ckptops)")
    # inspecting a file needs no optional package
    from ckptops.icv.file import ICV
    path = ICV(vectors={0: torch.ones(4)}, hidden_size=4, num_layers=1).save(tmp_path / "small.safetensors")
    assert run("icv", "inspect", path).exit_code == 0
