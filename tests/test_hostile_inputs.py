"""Every parser of untrusted input answers hostile content with one ``error: <file>: ...`` line.

One test per class an outside test pass found, through the CLI: exit code, exactly one line, no
traceback, the user's file named, and nothing written. Classes: deep nesting (RecursionError),
wrong JSON types, lone surrogates, NaN/Infinity, non-regular files (FIFO, /dev/zero) that would
block or never end, oversized files and fields, dangling symlinks, shards in an index subfolder,
and mistyped local paths that must not go to the Hub.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ckptops.cli import main

DEEP = "[" * 100000 + "]" * 100000


def _run(args: list[str], timeout: float = 20.0):
    started = time.perf_counter()
    result = CliRunner().invoke(main, args)
    assert time.perf_counter() - started < timeout
    return result


def _one_line(result, named: str, code: int = 1) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and named in lines[0], lines[0]
    lines[0].encode("utf-8")  # printable
    return lines[0]


def _tiny(folder: Path, names=("a", "b")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: torch.ones(4) for n in names}, str(folder / "model.safetensors"))
    return folder


# -- the index -----------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [
    '{"weight_map": ' + DEEP + "}",                       # RecursionError
    '{"weight_map": {"a": ["model.safetensors"]}}',       # wrong type
    '{"weight_map": {"\\ud800": "model.safetensors"}}',   # lone surrogate
    '{"weight_map": {"a": "model.safetensors"}, "x": NaN}',
    '[1, 2]',
    '{"weight_map": {"": "model.safetensors"}}',
])
def test_hostile_index_is_one_line(tmp_path, content):
    folder = _tiny(tmp_path / "m")
    index = folder / "model.safetensors.index.json"
    index.write_text(content)
    _one_line(_run(["inspect", str(folder)]), str(index))


def test_dangling_index_symlink_is_named_not_ignored(tmp_path):
    folder = _tiny(tmp_path / "m")
    (folder / "model.safetensors.index.json").symlink_to(tmp_path / "gone.json")
    line = _one_line(_run(["inspect", str(folder)]), "model.safetensors.index.json")
    assert "does not exist" in line


def test_index_naming_a_fifo_is_refused_without_blocking(tmp_path):
    folder = _tiny(tmp_path / "m")
    os.mkfifo(folder / "pipe.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model.safetensors", "c": "pipe.safetensors"}}))
    line = _one_line(_run(["inspect", str(folder)], timeout=10), "pipe.safetensors")
    assert "FIFO" in line


def test_shards_in_an_index_subfolder_sanitize_and_load(tmp_path):
    """Shards kept in a subfolder of the index: accepted by inspect, and sanitize writes them
    the same way (its error used to name ckptops' own temporary folder)."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    roots = {}
    for role in ("base", "harmful", "target"):
        folder = tmp_path / role
        (folder / "sub").mkdir(parents=True)
        save_file({"w": torch.randn(64, 8, generator=g)}, str(folder / "sub" / "part.safetensors"))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "sub/part.safetensors"}}))
        roots[role] = folder
    out = tmp_path / "out"
    result = _run(["sanitize", "--base", str(roots["base"]), "--harmful", str(roots["harmful"]),
                   "--target", str(roots["target"]), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    with safe_open(str(out / "sub" / "part.safetensors"), "pt") as f:
        assert f.get_tensor("w").shape == (64, 8)
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == {"w": "sub/part.safetensors"}


# -- prompt files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,content", [
    ("deep.jsonl", '{"prompt": ' + DEEP + "}\n"),
    ("deeparray.json", DEEP),
    ("surrogate.jsonl", '{"prompt": "hello \\ud800"}\n'),
    ("nan.jsonl", '{"prompt": "x", "score": NaN}\n'),
    ("long.jsonl", json.dumps({"prompt": "word " * 60000}) + "\n"),
    ("field.csv", "prompt,label\n\"" + "x" * 300000 + "\",harmful\n"),
])
def test_hostile_prompt_file_is_one_line_before_any_model_loads(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    missing_model = tmp_path / "no-model-needed"
    _tiny(missing_model)
    _one_line(_run(["eval", "--model", str(missing_model), "--prompts", str(path), "--label", "harmful",
                    "--threads", "1"]), str(path))


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_non_regular_prompt_and_recipe_files_are_refused_at_once(tmp_path, special):
    path = tmp_path / "pipe.jsonl" if special == "fifo" else Path(special)
    if special == "fifo":
        os.mkfifo(path)
    model = _tiny(tmp_path / "m")
    _one_line(_run(["eval", "--model", str(model), "--prompts", str(path), "--label", "harmful"], timeout=10), str(path))
    _one_line(_run(["run", str(path)], timeout=10), str(path))


# -- recipes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [
    "x = " + "[" * 5000 + "]" * 5000 + "\n",       # deep nesting
    "[hdr]\nscale = 1\n" + "# pad\n" * 300000,      # over the size cap
    "[hdr]\nscale = \"\\ud800\"\n",                 # invalid escape
    "\x00\x01 binary",
])
def test_hostile_recipe_is_one_line(tmp_path, content):
    path = tmp_path / "recipe.toml"
    path.write_text(content, encoding="utf-8")
    _one_line(_run(["run", str(path)]), str(path))


# -- ICV files -------------------------------------------------------------------------------------

def test_crafted_icv_header_is_one_line(tmp_path):
    path = tmp_path / "icv.safetensors"
    header = json.dumps({"icv.layers.0": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    _one_line(_run(["icv", "inspect", str(path)]), str(path))


# -- mistyped local paths never go to the Hub --------------------------------------------------------

@pytest.mark.parametrize("typo", ["{root}/targt", "./nope-{n}", "nope{n}", "{root}/a/b/c"])
def test_mistyped_local_path_says_no_such_folder_at_once(tmp_path, monkeypatch, typo):
    from ckptops.checkpoint import resolve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo" / "target").mkdir(parents=True)
    monkeypatch.setattr(resolve, "REMOTE_RESOLVERS", [lambda ref: pytest.fail(f"{ref} went to the Hub")])
    ref = typo.format(root="demo", n=1)
    line = _one_line(_run(["inspect", ref], timeout=5), ref)
    assert "no such file or folder" in line
    if ref == "demo/targt":
        assert "did you mean demo/target" in line


def test_icv_metadata_json_deeply_nested_is_one_line(tmp_path):
    from safetensors.torch import save_file as save

    from ckptops.icv.file import ICV

    meta = ICV(vectors={0: torch.ones(8)}, hidden_size=8, num_layers=1).metadata()
    meta["mlp_output_norms"] = DEEP
    path = tmp_path / "icv.safetensors"
    save({"icv.layers.0": torch.ones(8)}, str(path), metadata=meta)
    _one_line(_run(["icv", "inspect", str(path)]), str(path))


def test_adapter_config_deeply_nested_is_one_line(tmp_path):
    model = _tiny(tmp_path / "m")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": ' + DEEP + "}")
    save_file({"base_model.model.a.lora_A.weight": torch.ones(1, 4)}, str(adapter / "adapter_model.safetensors"))
    result = _run(["sanitize", "--base", str(model), "--harmful", str(adapter), "--target", str(model),
                   "--out", str(tmp_path / "out"), "-q"])
    _one_line(result, "adapter_config.json")
    assert not (tmp_path / "out").exists()


def test_question_file_fifo_is_refused(tmp_path):
    from ckptops.errors import UsageError
    from ckptops.harm.questions import load_questions

    fifo = tmp_path / "q.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="FIFO"):
        load_questions(fifo)


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_perplexity_file_that_never_ends_is_refused_before_the_model_loads(tmp_path, monkeypatch, special):
    import ckptops.icv.load as load_module

    monkeypatch.setattr(load_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    path = tmp_path / "text.txt" if special == "fifo" else Path(special)
    if special == "fifo":
        os.mkfifo(path)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    model = _tiny(tmp_path / "m")
    _one_line(_run(["eval", "--model", str(model), "--prompts", str(prompts), "--label", "harmful",
                    "--ppl", str(path), "--threads", "1"], timeout=10), str(path))


def test_recipe_with_a_mistyped_local_model_says_no_such_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _tiny(tmp_path / "demo" / "target")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[models]\nbase = "demo/target"\nharmful = "demo/target"\ntarget = "demo/targt"\n'
                      '[output]\nout = "o"\n')
    line = _one_line(_run(["run", str(recipe), "--threads", "1"], timeout=10), "demo/targt")
    assert "no such folder" in line


# -- side files (config, tokenizer, ...) that are symbolic links ------------------------------------

SECRET = "TOP SECRET: never copy me\n"


def _side_triple(tmp_path: Path) -> dict[str, Path]:
    """base / harmful / target with a config.json each; the target also holds a link inside the
    folder (``alias.json``), and ``secret.txt`` lies outside every model folder."""
    from conftest import llama_state, write_folder

    base = llama_state(0)
    paths = {"base": write_folder(tmp_path / "base", base),
             "harmful": write_folder(tmp_path / "harmful", llama_state(1, base=base, delta=0.01)),
             "target": write_folder(tmp_path / "target", llama_state(2, base=base, delta=0.004))}
    (paths["target"] / "alias.json").symlink_to("generation_config.json")  # inside: copied
    (tmp_path / "secret.txt").write_text(SECRET)
    return paths


def _sanitize_args(paths: dict[str, Path], out: Path) -> list[str]:
    return ["sanitize", "--base", str(paths["base"]), "--harmful", str(paths["harmful"]),
            "--target", str(paths["target"]), "--out", str(out), "-q"]


def _holds_secret(folder: Path) -> bool:
    return any(SECRET.strip() in f.read_text(errors="replace") for f in folder.rglob("*") if f.is_file())


@pytest.mark.parametrize("command", ["sanitize", "run"])
def test_side_file_linking_out_of_the_folder_is_skipped_with_a_warning(tmp_path, command):
    paths = _side_triple(tmp_path)
    (paths["target"] / "notes.txt").symlink_to(tmp_path / "secret.txt")
    out = tmp_path / "out"
    if command == "sanitize":
        args = _sanitize_args(paths, out)
    else:
        recipe = tmp_path / "r.toml"
        recipe.write_text(f'[models]\nbase = "{paths["base"]}"\nharmful = "{paths["harmful"]}"\n'
                          f'target = "{paths["target"]}"\n[icv]\nenabled = false\n[output]\nout = "{out}"\n')
        args = ["run", str(recipe), "-q", "--threads", "1"]
    result = _run(args, timeout=120)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:") and "link" in line]
    assert warnings == [f"warning: {paths['target'] / 'notes.txt'}: is a symbolic link to {tmp_path / 'secret.txt'}, "
                        "outside the model folder; it is not copied into the output"], result.output
    assert not (out / "notes.txt").exists() and not _holds_secret(out)
    # the link inside the folder and the ordinary side files are copied as before
    assert (out / "alias.json").read_text() == (paths["target"] / "generation_config.json").read_text()
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_needed_side_file_linking_out_is_refused_before_any_work(tmp_path, name):
    paths = _side_triple(tmp_path)
    link = paths["target"] / name
    if link.exists():
        link.unlink()
    link.symlink_to(tmp_path / "secret.txt")
    out = tmp_path / "out"
    line = _one_line(_run(_sanitize_args(paths, out)), str(link))
    assert f"symbolic link to {tmp_path / 'secret.txt'}" in line and "outside the model folder" in line
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_hub_cache_snapshot_links_into_its_blobs_are_copied(tmp_path):
    """A local path into the Hugging Face cache: every file of a snapshot is a link into the
    repo's blobs/ folder, which is outside the snapshot folder but inside the same repo folder."""
    paths = _side_triple(tmp_path)
    repo = tmp_path / "hub" / "models--org--target"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (paths["target"] / "tokenizer.json").write_text('{"version": "1.0"}')
    for file in sorted(paths["target"].iterdir()):
        if file.is_symlink():
            continue
        blob = repo / "blobs" / f"blob-{file.name}"
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)  # as huggingface_hub links
    (snapshot / "notes.txt").symlink_to(tmp_path / "secret.txt")  # out of the repo folder: still skipped
    out = tmp_path / "out"
    result = _run(_sanitize_args(dict(paths, target=snapshot), out))
    assert result.exit_code == 0, result.output
    assert [line for line in result.output.splitlines() if line.startswith("warning:") and "link" in line] == [
        f"warning: {snapshot / 'notes.txt'}: is a symbolic link to {tmp_path / 'secret.txt'}, outside the model "
        "folder; it is not copied into the output"]
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (paths["target"] / name).read_bytes(), name
    assert not (out / "notes.txt").exists() and not _holds_secret(out)


def test_a_local_dir_folder_linking_its_large_files_to_cache_blobs_works(tmp_path):
    """``huggingface-cli download --local-dir`` (older huggingface_hub) copies small files and
    links large ones (shards, a big tokenizer.json) to absolute paths in the cache's blobs/:
    those links count as inside, the files are copied; a link elsewhere is still refused."""
    paths = _side_triple(tmp_path)
    blobs = tmp_path / "cache" / "models--org--target" / "blobs"
    blobs.mkdir(parents=True)
    local_dir = tmp_path / "local-dir"
    local_dir.mkdir()
    (paths["target"] / "tokenizer.json").write_text('{"version": "1.0"}')
    for file in sorted(paths["target"].iterdir()):
        if file.is_symlink():
            continue
        if file.suffix == ".safetensors" or file.name == "tokenizer.json":
            blob = blobs / f"{len(file.name):040d}{file.stem}"
            blob.write_bytes(file.read_bytes())
            (local_dir / file.name).symlink_to(blob.resolve())
        else:
            (local_dir / file.name).write_bytes(file.read_bytes())
    out = tmp_path / "out"
    result = _run(_sanitize_args(dict(paths, target=local_dir), out))
    assert result.exit_code == 0, result.output
    assert (out / "tokenizer.json").read_bytes() == b'{"version": "1.0"}'
    elsewhere = tmp_path / "models--x" / "other" / "tokenizer.json"  # not a cache blob
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text("{}")
    (local_dir / "tokenizer.json").unlink()
    (local_dir / "tokenizer.json").symlink_to(elsewhere)
    _one_line(_run(_sanitize_args(dict(paths, target=local_dir), tmp_path / "out2")), "outside the model folder")


@pytest.mark.parametrize("role", ["--out", "--target"])
def test_a_path_that_is_not_utf8_is_refused_before_any_work(tmp_path, role):
    """Bytes that are not UTF-8 in a file name reach Python as lone surrogates, which no UTF-8
    text file (model card, recipe, report) can hold: refused at once, in one line, not as a
    traceback after the whole run."""
    from conftest import llama_state, write_folder

    paths = {r: write_folder(tmp_path / r, llama_state(i)) for i, r in enumerate(("base", "harmful", "target"))}
    bad = str(tmp_path / "model\udcff")  # how Python names the byte 0xFF in a path
    args = {"--base": str(paths["base"]), "--harmful": str(paths["harmful"]), "--target": str(paths["target"]),
            "--out": str(tmp_path / "out")}
    args[role] = bad
    result = CliRunner().invoke(main, ["sanitize", *[x for kv in args.items() for x in kv], "-q"])
    err = result.stderr.strip()
    assert result.exit_code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: the value of {role} '") and "model\\xff" in err and "not valid Unicode" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "harmful", "target"]
