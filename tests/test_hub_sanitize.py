"""Sanitize with Hub inputs, through the local FakeHub: the bytes equal a local-folder run (an
independent reference: the engine is tested bit-exact against hdr_reference elsewhere), the
commit is pinned, --low-disk empties the cache of input shards, offline mode reads the cache,
and a failing download leaves no output behind."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from huggingface_hub import hf_hub_download

import ckptops
from ckptops.cli import main
from ckptops.errors import HubError
from ckptops.hub import download as hub_download
from conftest import llama_state, write_folder
from hub_server import cached_files, hub, hub_environment, set_offline  # noqa: F401  (fixture)

ROLES = ("base", "harmful", "target")


def publish(hub, paths: dict) -> dict[str, str]:
    """Put the local triple on the fake Hub as org/base, org/harmful, org/target."""
    return {role: hub.add_folder(f"org/{role}", paths[role]) for role in ROLES}


def folder_files(folder: Path, skip=("README.md", "ckptops.json")) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name not in skip}


def front_matter(folder: Path) -> dict:
    text = (Path(folder) / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def sanitize_cli(out: Path, *extra: str, refs=("org/base", "org/harmful", "org/target")):
    args = ["sanitize", "--base", refs[0], "--harmful", refs[1], "--target", refs[2], "--out", str(out), "-q", *extra]
    return CliRunner().invoke(main, args)


@pytest.fixture
def local_run(triple, tmp_path):
    """The reference: the same sanitize on the local folders."""
    paths, _ = triple

    def run(name: str = "local", **options) -> Path:
        out = tmp_path / name
        ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], out, progress=False, **options)
        return out

    return run


def test_hub_run_gives_the_local_run_bytes_and_records_commits(hub, triple, tmp_path, local_run):
    paths, _ = triple
    commits = publish(hub, paths)
    report = ckptops.sanitize("org/base", "org/harmful", "org/target@main", tmp_path / "remote", progress=False)
    reference = folder_files(local_run())
    got = folder_files(tmp_path / "remote")
    assert got.keys() == reference.keys() and "config.json" in got and "model.safetensors.index.json" in got
    assert got == reference
    for role in ROLES:
        ident = report.inputs[role]
        assert ident["type"] == "hub" and ident["repo"] == f"org/{role}" and ident["commit"] == commits[role]
    assert report.inputs["target"]["revision"] == "main" and report.inputs["target"]["ref"] == "org/target@main"
    shard = paths["harmful"] / "model-00001-of-00002.safetensors"
    assert report.inputs["harmful"]["files_sha256"][shard.name] == hashlib.sha256(shard.read_bytes()).hexdigest()
    assert f"commit {commits['base']}" in report.format_text()
    card = front_matter(tmp_path / "remote")
    assert card["base_model"] == "org/target"
    assert card["safety_arithmetic"]["inputs"]["harmful"] == {"repo": "org/harmful", "revision": "main",
                                                              "commit": commits["harmful"]}
    provenance = json.loads((tmp_path / "remote" / "ckptops.json").read_text())
    assert provenance["inputs"]["base"]["commit"] == commits["base"]


@pytest.mark.parametrize("scope", ["global", "tensor", "layer"])
def test_low_disk_leaves_no_input_shard_in_the_cache(hub, triple, tmp_path, local_run, scope):
    paths, _ = triple
    publish(hub, paths)
    result = sanitize_cli(tmp_path / "remote", "--low-disk", "--scope", scope, "--json")
    assert result.exit_code == 0, result.output
    assert folder_files(tmp_path / "remote") == folder_files(local_run(scope=scope))
    assert json.loads(result.stdout)["thresholds"] == ckptops.sanitize(
        paths["base"], paths["harmful"], paths["target"], tmp_path / "again", scope=scope, progress=False).thresholds
    assert cached_files(hub.cache) == []
    # every scope: each input shard downloaded exactly once (global and layer scope select in the
    # one-read pass; its sample reads byte ranges of shards not downloaded yet)
    shards = [r.filename for r in hub.full_downloads()]
    assert len(shards) == 6 and len({(r.repo, r.filename) for r in hub.full_downloads()}) == 6
    io = json.loads(result.stdout)["io"]
    sizes = {role: sum(f.stat().st_size for f in paths[role].glob("*.safetensors")) for role in ROLES}
    assert io["target"]["downloaded"] == sizes["target"]
    for role in ("base", "harmful"):  # the shards, plus the sample's ranges where scope selects
        assert sizes[role] <= io[role]["downloaded"] <= 2 * sizes[role]
    assert cached_files(hub.cache, ".json")  # small files (config, index) stay cached


def test_low_disk_with_the_same_repo_as_base_and_target(hub, triple, tmp_path):
    """theta_t = theta_b: one repo read in two roles is evicted only when neither needs it."""
    paths, _ = triple
    publish(hub, paths)
    result = sanitize_cli(tmp_path / "remote", "--low-disk", "--exclude", "lm_head", refs=("org/base", "org/harmful", "org/base"))
    assert result.exit_code == 0, result.output
    ckptops.sanitize(paths["base"], paths["harmful"], paths["base"], tmp_path / "local", exclude=["lm_head"], progress=False)
    assert folder_files(tmp_path / "remote") == folder_files(tmp_path / "local")
    assert cached_files(hub.cache) == []


def test_low_disk_keeps_what_was_cached_before(hub, triple, tmp_path):
    paths, _ = triple
    commits = publish(hub, paths)
    kept = hf_hub_download("org/target", "model-00002-of-00003.safetensors", revision=commits["target"])
    assert sanitize_cli(tmp_path / "remote", "--low-disk").exit_code == 0
    assert cached_files(hub.cache) == ["org/target/model-00002-of-00003.safetensors"]
    assert Path(kept).is_file()


def test_low_disk_peak_depends_on_scope(hub, tmp_path, monkeypatch):
    """With 4 shards per model: tensor scope holds one shard per model at a time; global scope
    must hold all of base and harmful through selection; a normal run keeps everything."""
    base = llama_state(0)
    states = {"base": base, "harmful": llama_state(1, base=base, delta=0.01),
              "target": llama_state(2, base=base, delta=0.004)}
    for role in ROLES:
        hub.add_folder(f"org/{role}", write_folder(tmp_path / role, states[role], shards=4))
    peaks: list[int] = []
    real = hub_download.hf_hub_download

    def counting(*args, **kwargs):
        path = real(*args, **kwargs)
        peaks.append(len(cached_files(hub.cache)))
        return path

    monkeypatch.setattr(hub_download, "hf_hub_download", counting)
    found = {}
    for scope, extra in (("tensor", ["--low-disk"]), ("global", ["--low-disk"]), ("normal", [])):
        peaks.clear()
        args = ["--scope", "tensor" if scope == "tensor" else "global", *extra]
        result = sanitize_cli(tmp_path / f"out-{scope}", *args)
        assert result.exit_code == 0, result.output
        found[scope] = max(peaks)
        for cached in Path(hub.cache).glob("models--*/snapshots/*/*.safetensors"):
            cached.unlink()  # start each run from an empty cache
    assert found["tensor"] <= 3, found
    assert found["global"] <= 3, found  # one shard per model (the one-read pass releases as it goes)
    assert found["normal"] == 12, found
    assert folder_files(tmp_path / "out-global") == folder_files(tmp_path / "out-normal")


def test_offline_runs_from_the_cache(hub, triple, tmp_path, monkeypatch):
    paths, _ = triple
    publish(hub, paths)
    assert sanitize_cli(tmp_path / "online").exit_code == 0
    seen = len(hub.requests)
    set_offline(monkeypatch, True)
    result = sanitize_cli(tmp_path / "offline")
    assert result.exit_code == 0, result.output
    assert folder_files(tmp_path / "offline") == folder_files(tmp_path / "online")
    assert len(hub.requests) == seen  # not a single request


def test_offline_after_low_disk_names_the_missing_shard(hub, triple, tmp_path, monkeypatch):
    paths, _ = triple
    publish(hub, paths)
    assert sanitize_cli(tmp_path / "online", "--low-disk").exit_code == 0
    set_offline(monkeypatch, True)
    result = sanitize_cli(tmp_path / "offline")
    assert result.exit_code == 1
    assert "HF_HUB_OFFLINE" in result.stderr and "not in the Hugging Face cache" in result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error: org/base@main: ") and ".safetensors weights" in line
    assert not (tmp_path / "offline").exists()


def test_pinned_commit_survives_the_branch_moving_mid_run(hub, triple, tmp_path, local_run):
    paths, states = triple
    commits = publish(hub, paths)
    other = {n: (v.float() * 1.5).to(torch.bfloat16) for n, v in states["target"].items()}
    moved = hub.add_folder("org/target", write_folder(tmp_path / "target2", other, shards=3), branch=None)

    def move_on_first_download(record):
        if record.method == "GET" and record.filename.endswith(".safetensors") and not record.range:
            hub.move_branch("org/target", "main", moved)

    hub.on_request = move_on_first_download
    report = ckptops.sanitize("org/base", "org/harmful", "org/target", tmp_path / "remote", progress=False)
    assert hub.repos["org/target"].refs["main"] == moved  # the branch did move during the run
    assert report.inputs["target"]["commit"] == commits["target"]
    assert folder_files(tmp_path / "remote") == folder_files(local_run())
    assert {r.revision for r in hub.resolves() if r.repo == "org/target"} == {commits["target"]}


def test_connection_cut_mid_shard_is_retried(hub, triple, tmp_path, local_run):
    """huggingface_hub retries a transfer cut mid-body (resuming with a Range request once it has
    written at least one 10 MB block; these test shards are smaller, so it starts over)."""
    paths, _ = triple
    publish(hub, paths)
    hub.fail("org/harmful", "model-00002-of-00002.safetensors", "cut", times=1)
    result = sanitize_cli(tmp_path / "remote")
    assert result.exit_code == 0, result.output
    assert folder_files(tmp_path / "remote") == folder_files(local_run())
    gets = [r.served for r in hub.resolves("model-00002-of-00002.safetensors")
            if r.repo == "org/harmful" and r.method == "GET" and not r.range]
    size = (paths["harmful"] / "model-00002-of-00002.safetensors").stat().st_size
    assert gets == [(0, size // 2), (0, size)]  # cut half-way, then fetched again in full


def test_download_that_keeps_failing_is_a_clear_error_and_writes_nothing(hub, triple, tmp_path):
    paths, _ = triple
    publish(hub, paths)
    hub.fail("org/target", "model-00002-of-00003.safetensors", "500", times=100)
    out = tmp_path / "remote"
    result = sanitize_cli(out)
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: org/target@") and "model-00002-of-00003.safetensors" in line
    assert "download failed after 3 attempts" in line and "run again to resume" in line
    assert not out.exists() and not list(tmp_path.glob(".remote.ckptops-tmp-*"))
    failing_gets = [r for r in hub.resolves("model-00002-of-00003.safetensors") if r.method == "GET" and not r.range]
    assert len(failing_gets) == 3


@pytest.mark.parametrize("marker", ["tag", "provenance"])
def test_an_already_sanitized_hub_target_is_refused(hub, triple, tmp_path, local_run, marker):
    paths, _ = triple
    publish(hub, paths)
    done = local_run()
    (done / ("ckptops.json" if marker == "tag" else "README.md")).unlink()  # keep one marker only
    hub.add_folder("me/already-safe", done)
    result = sanitize_cli(tmp_path / "twice", refs=("org/base", "org/harmful", "me/already-safe"))
    assert result.exit_code == 2 and "me/already-safe: already sanitized" in result.stderr
    assert hub.weight_bytes_served() == 0
    assert sanitize_cli(tmp_path / "twice", "--force", refs=("org/base", "org/harmful", "me/already-safe")).exit_code == 0


def test_library_error_for_unknown_repo_names_it(hub, triple, tmp_path):
    paths, _ = triple
    with pytest.raises(HubError, match="org/nothere: no such local folder, and no model repo"):
        ckptops.sanitize(paths["base"], "org/nothere", paths["target"], tmp_path / "out", progress=False)


def test_cli_in_a_fresh_process_reads_the_hf_environment(hub, triple, tmp_path, local_run):
    """No monkeypatching: HF_ENDPOINT / HF_HUB_CACHE / HF_HOME in the environment of a new
    process are all huggingface_hub needs."""
    paths, _ = triple
    publish(hub, paths)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(hub_environment(hub, tmp_path / "fresh"))
    out = tmp_path / "remote"
    done = subprocess.run(
        [sys.executable, "-m", "ckptops.cli", "sanitize", "--base", "org/base", "--harmful", "org/harmful",
         "--target", "org/target", "--out", str(out), "-q", "--low-disk", "--json"],
        env=env, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["inputs"]["base"]["endpoint"] == hub.url, done.stdout
    assert folder_files(out) == folder_files(local_run())
    assert cached_files(tmp_path / "fresh" / "hf-cache") == []
    # global scope under --low-disk: the one-read pass downloads each of the 6 shards once
    assert len(hub.full_downloads()) == 6, hub.full_downloads()
