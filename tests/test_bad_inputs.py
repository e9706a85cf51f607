"""Every bad input gets a one-line error naming the problem, exit != 0, and no output."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckptops.cli import main
from conftest import llama_state, write_folder


#: every test here runs on both engine paths (fused C loops and torch ops)
pytestmark = pytest.mark.usefixtures("engine_path")

def folder_digest(folder: Path) -> str | None:
    if not folder.exists():
        return None
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        h.update(str(f.relative_to(folder)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def run_sanitize(paths: dict, out: Path, *extra: str):
    args = ["sanitize", "--base", str(paths["base"]), "--harmful", str(paths["harmful"]),
            "--target", str(paths["target"]), "--out", str(out), "-q", *extra]
    return CliRunner().invoke(main, args)


def assert_one_line_error(result, *needles: str):
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    err = result.stderr.strip()
    assert "Traceback" not in result.output
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle.lower() in err.lower(), err


def _rewrite_header(file: Path, mutate) -> None:
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    mutate(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


CORRUPTIONS = {
    "truncated shard": (lambda f: f.write_bytes(f.read_bytes()[:-100]), ["truncated"]),
    "header length beyond file": (lambda f: f.write_bytes(struct.pack("<Q", 10**7) + f.read_bytes()[8:]), ["past the end"]),
    "header over 100MB": (lambda f: f.write_bytes(struct.pack("<Q", 2 * 10**8) + f.read_bytes()[8:]), ["cap"]),
    "header not JSON": (lambda f: f.write_bytes(f.read_bytes()[:8] + b"{not json" + f.read_bytes()[17:]), ["not valid JSON"]),
    "unknown dtype": (lambda f: _rewrite_header(f, lambda h: h[_first_tensor(h)].update(dtype="Q7")), ["unknown dtype"]),
    "overlapping offsets": (
        lambda f: _rewrite_header(f, lambda h: [h[k].update(data_offsets=[0, h[k]["data_offsets"][1] - h[k]["data_offsets"][0]])
                                                for k in list(h)[1:3] if k != "__metadata__"]),
        ["overlap"],
    ),
    "out-of-bounds offsets": (
        lambda f: _rewrite_header(f, lambda h: h[_first_tensor(h)].update(
            data_offsets=[10**9, 10**9 + h[_first_tensor(h)]["data_offsets"][1] - h[_first_tensor(h)]["data_offsets"][0]])),
        ["beyond"],
    ),
    "size not matching shape": (lambda f: _rewrite_header(f, lambda h: h[_first_tensor(h)].update(shape=[3, 3])), ["needs"]),
    "duplicate tensor name": (
        lambda f: f.write_bytes(f.read_bytes()),  # replaced below with a raw duplicate
        ["duplicate"],
    ),
}


@pytest.fixture
def paths(tmp_path):
    base = llama_state(0)
    return {
        "base": write_folder(tmp_path / "base", base),
        "harmful": write_folder(tmp_path / "harmful", llama_state(1, base=base, delta=0.01), shards=2),
        "target": write_folder(tmp_path / "target", llama_state(2, base=base, delta=0.004)),
    }


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
@pytest.mark.parametrize("overwrite", [False, True])
def test_corrupt_headers(paths, tmp_path, case, overwrite):
    shard = paths["harmful"] / "model-00002-of-00002.safetensors"
    corrupt, needles = CORRUPTIONS[case]
    if case == "duplicate tensor name":
        raw = shard.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        text = raw[8:8 + n].decode().rstrip()
        first = text[1:].split('},', 1)[0] + "}"
        text = "{" + first + "," + text[1:]
        text += " " * (-len(text) % 8)
        shard.write_bytes(struct.pack("<Q", len(text)) + text.encode() + raw[8 + n:])
    else:
        corrupt(shard)
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "keep.txt").write_text("previous result")
    before = folder_digest(out)
    result = run_sanitize(paths, out, *(["--overwrite"] if overwrite else []))
    assert_one_line_error(result, *needles, "model-00002-of-00002.safetensors")
    assert folder_digest(out) == before
    assert not list(tmp_path.glob(".out.ckptops-tmp-*"))


def test_truncated_file_shorter_than_8_bytes(paths, tmp_path):
    (paths["base"] / "model.safetensors").write_bytes(b"\x01\x02")
    assert_one_line_error(run_sanitize(paths, tmp_path / "out"), "too short", "model.safetensors")


def test_index_leaving_folder_and_missing_shard(paths, tmp_path):
    index = paths["harmful"] / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    original = dict(data["weight_map"])
    name = next(iter(original))
    data["weight_map"][name] = "../base/model.safetensors"
    index.write_text(json.dumps(data))
    assert_one_line_error(run_sanitize(paths, tmp_path / "out"), "leaves the model folder")
    data["weight_map"] = dict(original, **{name: "model-00009-of-00009.safetensors"})
    index.write_text(json.dumps(data))
    assert_one_line_error(run_sanitize(paths, tmp_path / "out"), "does not exist", "model-00009-of-00009")
    index.write_text("{broken")
    assert_one_line_error(run_sanitize(paths, tmp_path / "out"), "index.json", "not valid JSON")
    assert not (tmp_path / "out").exists()


def test_pickle_only_folder_is_refused_without_unpickling(paths, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    # a file that would run code if unpickled: ckptops must never open it with pickle
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    paths["target"] = pickled
    assert_one_line_error(run_sanitize(paths, tmp_path / "out"), "pickle", "pytorch_model.bin")
    paths["target"] = pickled / "pytorch_model.bin"
    assert_one_line_error(run_sanitize(paths, tmp_path / "out"), "pickle")
    assert not (tmp_path / "pwned").exists()


def test_shape_mismatch_and_missing_tensor(paths, tmp_path):
    state = llama_state(2)
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(8, 8, dtype=torch.bfloat16)
    del state["model.layers.1.mlp.down_proj.weight"]
    shutil.rmtree(paths["target"])
    write_folder(paths["target"], state)
    result = run_sanitize(paths, tmp_path / "out")
    assert_one_line_error(result, "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("role", ["base", "harmful", "target"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_any_input(paths, tmp_path, role, bad):
    folder = paths[role]
    base = llama_state(0)
    state = {"base": base, "harmful": llama_state(1, base=base, delta=0.01), "target": llama_state(2, base=base, delta=0.004)}[role]
    state["model.layers.2.self_attn.v_proj.weight"][3, 4] = bad
    shutil.rmtree(folder)
    write_folder(folder, state)
    out = tmp_path / "out"
    assert_one_line_error(run_sanitize(paths, out), "NaN or Inf", "model.layers.2.self_attn.v_proj.weight", role)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.ckptops-tmp-*"))


def test_empty_folder_and_missing_path(paths, tmp_path):
    (tmp_path / "empty").mkdir()
    paths["base"] = tmp_path / "empty"
    assert_one_line_error(run_sanitize(paths, tmp_path / "out"), "empty")
    paths["base"] = tmp_path / "nowhere"
    assert_one_line_error(run_sanitize(paths, tmp_path / "out"), "nowhere")


@pytest.mark.parametrize("content,needle", [
    ("{bad", "not valid JSON"), ("[1, 2]", "not a JSON object"), ('"llama"', "not a JSON object"), ("", "not valid JSON"),
])
def test_target_config_that_is_not_a_json_object_is_refused_before_any_work(paths, tmp_path, content, needle):
    """The output copies the target's config.json as it is: one that is not a JSON object would
    give an output that does not load."""
    config = paths["target"] / "config.json"
    config.write_text(content)
    assert_one_line_error(run_sanitize(paths, tmp_path / "out"), str(config), needle)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_target_without_config_runs_with_one_warning(paths, tmp_path):
    (paths["target"] / "config.json").unlink()
    out = tmp_path / "out"
    result = run_sanitize(paths, out)
    assert result.exit_code == 0, result.output
    assert f"warning: {paths['target']}: has no config.json, so the output will have none either and " \
           "transformers' from_pretrained cannot load it as is" in result.stderr.splitlines(), result.stderr
    assert (out / "model.safetensors").is_file() and not (out / "config.json").exists()


@pytest.mark.parametrize("option,value,needle", [
    ("--top-k", "0", "top-k"), ("--top-k", "1.5", "top-k"), ("--top-k", "-0.1", "top-k"),
    ("--top-k", "nan", "top-k"), ("--scale", "inf", "scale"), ("--scale", "nan", "scale"),
    ("--max-memory", "lots", "max-memory"), ("--max-memory", "10MiB", "max-memory"),
    ("--layers", "6-4", "layers"), ("--exclude", "([", "exclude"), ("--shard-size", "0", "shard-size"),
])
def test_bad_options(paths, tmp_path, option, value, needle):
    assert_one_line_error(run_sanitize(paths, tmp_path / "out", option, value), needle)
    assert not (tmp_path / "out").exists()


def test_out_equal_to_an_input_or_existing(paths, tmp_path):
    before = folder_digest(paths["target"])
    assert_one_line_error(run_sanitize(paths, paths["target"], "--overwrite"), "input")
    assert_one_line_error(run_sanitize(paths, tmp_path, "--overwrite"), "input")
    assert folder_digest(paths["target"]) == before
    (tmp_path / "out").mkdir()
    assert_one_line_error(run_sanitize(paths, tmp_path / "out"), "already exists", "--overwrite")


def test_overwrite_replaces_only_when_complete(paths, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    result = run_sanitize(paths, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()


def test_console_script_prints_no_traceback(paths, tmp_path):
    (paths["base"] / "model.safetensors").write_bytes(b"\x00" * 7)
    proc = subprocess.run([sys.executable, "-m", "ckptops.cli", "sanitize", "--base", str(paths["base"]),
                           "--harmful", str(paths["harmful"]), "--target", str(paths["target"]),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr + proc.stdout
