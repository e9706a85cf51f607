"""Hub references: parsing, preflight by range requests (no weight byte moves), and one-line
errors that name the repo and file. Everything runs against the local FakeHub server."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from click.testing import CliRunner

from ckptops.checkpoint.resolve import open_checkpoint
from ckptops.cli import main
from ckptops.errors import CheckpointError, HeaderError, HubError
from ckptops.hub.refs import HubRef, parse_hub_ref
from conftest import llama_state, write_folder
from hub_server import hub, set_offline  # noqa: F401  (fixture)


def _error_line(result) -> str:
    """The CLI failed with a one-line ``error:`` message and no traceback; return that line."""
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("text, expected", [
    ("meta-llama/Llama-2-7b-chat-hf", HubRef("meta-llama/Llama-2-7b-chat-hf")),
    ("me/llama2-harmful@main", HubRef("me/llama2-harmful", "main")),
    ("org/name@refs/pr/3", HubRef("org/name", "refs/pr/3")),
    ("org/name@" + "a" * 40, HubRef("org/name", "a" * 40)),
    ("gpt2", None),               # bare names are local folders only
    ("./org/name", None),
    ("/abs/org/name", None),
    ("org/name/extra", None),
    ("org--x/name", None),
    ("org/na..me", None),
    ("org/name@", None),
    ("org/name@../main", None),
])
def test_parse_hub_ref(text, expected):
    assert parse_hub_ref(text) == expected


def test_inspect_reads_headers_only(hub, tmp_path):
    state = llama_state(0)
    sha = hub.add_folder("org/base", write_folder(tmp_path / "base", state, shards=2))
    result = CliRunner().invoke(main, ["inspect", "org/base", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["identity"]["commit"] == sha and info["identity"]["type"] == "hub"
    assert info["identity"]["repo"] == "org/base" and info["identity"]["revision"] == "main"
    assert set(info["tensors"]) == set(state)
    assert info["tensors"]["model.layers.0.mlp.up_proj.weight"]["shape"] == [64, 32]
    # only the two range requests per shard touched the weight files: no data byte was sent
    assert hub.weight_bytes_served() == 0 and not hub.full_downloads()
    ranges = [r.range for r in hub.resolves(".safetensors")]
    assert len(ranges) == 4 and all(r and r.startswith("bytes=") for r in ranges)
    # and every file request named the pinned commit, not the branch
    assert {r.revision for r in hub.resolves()} == {sha}


def test_revision_pinning_by_tag_and_hash(hub, tmp_path):
    first = hub.add_folder("org/m", write_folder(tmp_path / "a", llama_state(0)), branch="v1")
    second = hub.add_folder("org/m", write_folder(tmp_path / "b", llama_state(1)), branch="main")
    assert open_checkpoint("org/m@v1").identity["commit"] == first
    assert open_checkpoint("org/m").identity["commit"] == second
    pinned = open_checkpoint(f"org/m@{first}")
    assert pinned.identity["commit"] == first and pinned.identity["revision"] == first


def test_local_folder_wins_over_hub(hub, tmp_path, monkeypatch):
    write_folder(tmp_path / "org" / "base", llama_state(0))
    monkeypatch.chdir(tmp_path)
    assert open_checkpoint("org/base").identity["type"] == "local"
    assert hub.requests == []


def test_preflight_catches_shape_mismatch_before_any_download(hub, tmp_path):
    base = llama_state(0)
    harmful = llama_state(1, base=base, delta=0.01)
    target = dict(llama_state(2, base=base, delta=0.004))
    target["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(16, 32, dtype=torch.bfloat16)
    for name, state, shards in (("base", base, 1), ("harmful", harmful, 2), ("target", target, 3)):
        hub.add_folder(f"org/{name}", write_folder(tmp_path / name, state, shards=shards))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["sanitize", "--base", "org/base", "--harmful", "org/harmful",
                                       "--target", "org/target", "--out", str(out), "-q"])
    line = _error_line(result)
    assert "q_proj" in line and "shapes" in line
    assert hub.weight_bytes_served() == 0 and not hub.full_downloads()
    assert not out.exists()


def test_bad_header_on_the_hub_is_refused_like_a_local_one(hub, tmp_path):
    folder = write_folder(tmp_path / "m", llama_state(0))
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    sha = hub.add_folder("org/bad", folder)
    with pytest.raises(HeaderError, match=rf"org/bad@{sha[:12]}/model.safetensors: header length .* past the end"):
        open_checkpoint("org/bad")
    assert hub.weight_bytes_served() == 0


@pytest.mark.parametrize("ref, needles", [
    ("org/missing", ["org/missing", "no such local folder", "no model repo"]),
    ("org/base@nope", ["org/base", "revision 'nope' not found"]),
])
def test_missing_repo_or_revision(hub, tmp_path, ref, needles):
    hub.add_folder("org/base", write_folder(tmp_path / "base", llama_state(0)))
    line = _error_line(CliRunner().invoke(main, ["inspect", ref]))
    for needle in needles:
        assert needle in line


def test_gated_repo_needs_a_token_that_is_never_printed(hub, tmp_path, monkeypatch):
    sha = hub.add_folder("org/gated", write_folder(tmp_path / "g", llama_state(0)), gated=True)
    hub.token = "hf_rightsecret"
    line = _error_line(CliRunner().invoke(main, ["inspect", "org/gated"]))
    assert "org/gated" in line and "model.safetensors" in line and "gated" in line and "HF_TOKEN" in line

    monkeypatch.setenv("HF_TOKEN", "hf_wrongsecret")
    result = CliRunner().invoke(main, ["inspect", "org/gated"])
    assert "hf_wrongsecret" not in result.output and "hf_wrongsecret" not in _error_line(result)

    monkeypatch.setenv("HF_TOKEN", "hf_rightsecret")
    result = CliRunner().invoke(main, ["inspect", "org/gated"])
    assert result.exit_code == 0, result.output
    assert sha in result.output and "hf_rightsecret" not in result.output
    assert hub.resolves(".safetensors")[-1].authorized


def test_pickle_only_repo_is_refused_without_downloading_it(hub):
    hub.add_commit("org/pickled", {"pytorch_model.bin": b"\x80\x04" + b"x" * 100, "config.json": b"{}"})
    with pytest.raises(CheckpointError, match="org/pickled@main: holds only pickle checkpoints"):
        open_checkpoint("org/pickled")
    assert not hub.resolves(".bin")


def test_offline_with_nothing_cached(hub, monkeypatch):
    hub.add_commit("org/x", {"model.safetensors": b""})
    set_offline(monkeypatch, True)
    with pytest.raises(HubError, match="org/x@main: HF_HUB_OFFLINE is set .* not in the Hugging Face cache"):
        open_checkpoint("org/x")
    assert hub.requests == []
