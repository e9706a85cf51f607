"""A newcomer's first hour: the demo's models run with every command it suggests, and a recipe
rerun from the stored recipe writes the same bytes in every file (issue classes 7 and 8)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptops.cli import main

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

_RUNS_A_MODEL = ("generate", "icv compute", "eval", "run ")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("newcomer") / "demo"
    result = CliRunner().invoke(main, ["demo", "--workdir", str(root)])
    assert result.exit_code == 0, result.output
    return root, result.output


def test_demo_models_carry_a_tokenizer_and_every_suggested_command_runs(demo):
    from ckptops.commands.demo import next_commands

    root, output = demo
    for role in ("base", "harmful", "target", "sanitized"):
        assert (root / role / "tokenizer.json").is_file() and (root / role / "tokenizer_config.json").is_file()
    commands = next_commands(root)
    for command in commands:
        assert command in output  # the demo ends by printing them
    run_cmd = next(c for c in commands if c.startswith("ckptops run "))
    for command in commands:
        if command == run_cmd:
            continue  # exercised (twice) below
        args = shlex.split(command)[1:]
        if any(word in command for word in _RUNS_A_MODEL):
            args += ["--threads", "1"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, (command, result.output, result.exception)
        assert "error:" not in result.output, (command, result.output)


def test_recipe_rerun_is_byte_for_byte_and_names_no_temporary_folder(demo):
    root, _ = demo
    first, again = root / "recipe-out", root / "again"
    result = CliRunner().invoke(main, ["run", str(root / "recipe.toml"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert f"wrote {first}" in result.output.splitlines()[0] or f"wrote {first}" in result.output
    rerun = CliRunner().invoke(main, ["run", str(first / "recipe.toml"), "--out", str(again), "--threads", "1"])
    assert rerun.exit_code == 0, rerun.output
    assert f"wrote {again}" in rerun.output
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert Path("icv.safetensors") in files and Path("ckptops.json") in files
    for name in files:
        a, b = (first / name).read_bytes(), (again / name).read_bytes()
        assert a == b, f"{name} differs between the run and its rerun"
        assert b".recipe-" not in a and b"ckptops-tmp" not in a, f"{name} names a temporary folder"
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "temporary folders left"
