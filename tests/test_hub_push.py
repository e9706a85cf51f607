"""Push: the exact calls made against a recording fake ``HfApi``, the model card's front matter
parsed back, --dry-run, and failures that leave the folder intact and say how to retry."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

import ckptops
from ckptops.cli import main
from ckptops.errors import HubError
from ckptops.hub import push as push_module
from hub_server import hub  # noqa: F401  (fixture)

REPO = "me/wm-safe"


class FakeApi:
    """Records every call; ``upload_folder`` also snapshots the folder as it was uploaded."""

    def __init__(self, existing_private: bool | None = None, fail_upload: Exception | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        self.existing_private = existing_private
        self.fail_upload = fail_upload

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if self.existing_private is None:
            self.existing_private = bool(kwargs.get("private"))
        return f"https://hub.test/{repo_id}"

    def model_info(self, repo_id, **kwargs):
        self.calls.append(("model_info", {"repo_id": repo_id, **kwargs}))
        return SimpleNamespace(private=self.existing_private)

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        """What huggingface_hub's upload_folder sends: every file under the folder (symbolic links
        followed, as it does), filtered by the patterns with huggingface_hub's own matcher."""
        from huggingface_hub.utils import filter_repo_objects

        self.calls.append(("upload_folder", kwargs))
        if self.fail_upload is not None:
            raise self.fail_upload
        folder = Path(kwargs["folder_path"])
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.glob("**/*")) if p.is_file()}
        kept = filter_repo_objects(list(files), allow_patterns=kwargs.get("allow_patterns"),
                                   ignore_patterns=kwargs.get("ignore_patterns"))
        self.uploaded = {name: files[name].read_bytes() for name in kept}
        return SimpleNamespace(oid="c" * 40, commit_url=f"https://hub.test/{kwargs['repo_id']}/commit/{'c' * 40}")


def digest(folder: Path, skip=("README.md",)) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file() and f.name not in skip:
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def fake_api(monkeypatch):
    api = FakeApi()
    monkeypatch.setattr(push_module, "make_api", lambda token=None: api)
    return api


@pytest.fixture
def hub_triple(hub, triple):
    paths, _ = triple
    return {role: hub.add_folder(f"org/{role}", paths[role]) for role in ("base", "harmful", "target")}


def test_sanitize_push_to_hub_makes_exactly_these_calls(hub, hub_triple, fake_api, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_pushsecret")
    out = tmp_path / "wm-safe"
    result = CliRunner().invoke(main, [
        "sanitize", "--base", "org/base", "--harmful", "org/harmful", "--target", "org/target", "--out", str(out),
        "-q", "--json", "--push-to-hub", REPO, "--private", "--branch", "dev", "--commit-message", "safety pass"])
    assert result.exit_code == 0, result.output
    assert "hf_pushsecret" not in result.output
    assert fake_api.calls == [
        ("create_repo", {"repo_id": REPO, "repo_type": "model", "private": True, "exist_ok": True}),
        ("model_info", {"repo_id": REPO}),
        ("create_branch", {"repo_id": REPO, "branch": "dev", "exist_ok": True}),
        ("upload_folder", {"repo_id": REPO, "folder_path": str(out), "repo_type": "model", "revision": "dev",
                           "commit_message": "safety pass", "ignore_patterns": [".*", "*/.*"],
                           "delete_patterns": ["*.safetensors", "*.safetensors.index.json"]}),
    ]
    report = json.loads(result.stdout)
    assert report["pushed"]["url"] == f"https://hub.test/{REPO}" and report["pushed"]["commit"] == "c" * 40
    # what was uploaded is the folder as written, and the card carries every input's commit
    assert set(fake_api.uploaded) == {p.name for p in out.iterdir()}
    card = ModelCard(fake_api.uploaded["README.md"].decode())
    data = card.data.to_dict()
    assert data["base_model"] == "org/target"
    assert {"safety-arithmetic", "ckptops"} <= set(data["tags"]) and data["library_name"] == "transformers"
    block = data["safety_arithmetic"]
    assert block["method"] == "harm-direction-removal" and block["top_k"] == 0.1 and block["scale"] == 3.0
    assert block["scope"] == "global"
    for role in ("base", "harmful", "target"):
        assert block["inputs"][role] == {"repo": f"org/{role}", "revision": "main", "commit": hub_triple[role]}
    assert f"snapshot_download('{REPO}')" in card.text and "ckptops.from_pretrained(folder)" in card.text
    assert "icv.safetensors" in card.text


def test_push_without_a_token_fails_before_any_work(hub, hub_triple, fake_api, tmp_path):
    result = CliRunner().invoke(main, [
        "sanitize", "--base", "org/base", "--harmful", "org/harmful", "--target", "org/target",
        "--out", str(tmp_path / "o"), "-q", "--push-to-hub", REPO])
    assert result.exit_code == 1
    assert "needs a token" in result.stderr and REPO in result.stderr
    assert hub.requests == [] and fake_api.calls == [] and not (tmp_path / "o").exists()


def test_push_options_need_push_to_hub(triple, tmp_path):
    paths, _ = triple
    result = CliRunner().invoke(main, [
        "sanitize", "--base", str(paths["base"]), "--harmful", str(paths["harmful"]), "--target", str(paths["target"]),
        "--out", str(tmp_path / "o"), "-q", "--private"])
    assert result.exit_code == 2 and "only apply with --push-to-hub" in result.stderr


@pytest.fixture
def sanitized(triple, tmp_path):
    paths, _ = triple
    out = tmp_path / "wm-safe"
    ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], out, progress=False)
    return out


def test_push_command_regenerates_the_card_and_uploads(sanitized, fake_api, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    before = (sanitized / "README.md").read_text()
    assert "path/to/this/folder" in before
    result = CliRunner().invoke(main, ["push", str(sanitized), REPO])
    assert result.exit_code == 0, result.output
    assert f"https://hub.test/{REPO}" in result.stdout and "cccccccccccc" in result.stdout
    assert [name for name, _ in fake_api.calls] == ["create_repo", "upload_folder"]
    assert fake_api.calls[0][1]["private"] is False and fake_api.calls[1][1]["revision"] is None
    uploaded_card = fake_api.uploaded["README.md"].decode()
    assert uploaded_card == (sanitized / "README.md").read_text()  # the folder mirrors the repo
    assert f"from_pretrained('{REPO}')" in uploaded_card
    assert ModelCard(uploaded_card).data.to_dict()["safety_arithmetic"]["inputs"]["base"]["ref"].endswith("base")


def test_an_edited_card_is_uploaded_as_it_is(sanitized, fake_api, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    edited = (sanitized / "README.md").read_text() + "\n## Notes\n\nEvaluated by hand.\n"
    (sanitized / "README.md").write_text(edited)
    assert "uploaded as it is" in CliRunner().invoke(main, ["push", str(sanitized), REPO, "--dry-run"]).stdout
    assert CliRunner().invoke(main, ["push", str(sanitized), REPO]).exit_code == 0
    assert fake_api.uploaded["README.md"].decode() == edited == (sanitized / "README.md").read_text()


def test_dry_run_lists_files_without_network_or_token(sanitized, fake_api):
    result = CliRunner().invoke(main, ["push", str(sanitized), REPO, "--private", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    names = {f["path"]: f["bytes"] for f in plan["files"]}
    assert names == {p.name: p.stat().st_size for p in sanitized.iterdir()}
    assert plan["private"] is True and plan["repo_id"] == REPO and plan["card"] is True
    text = CliRunner().invoke(main, ["push", str(sanitized), REPO, "--dry-run"]).stdout
    assert "would push" in text and "model-00001-of-00003.safetensors" in text
    assert fake_api.calls == []


def test_push_failure_leaves_the_folder_intact_and_says_how_to_retry(sanitized, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    api = FakeApi(fail_upload=httpx2.ConnectError("connection reset by peer (hf_secret_token)"))
    monkeypatch.setattr(push_module, "make_api", lambda token=None: api)
    before = digest(sanitized)
    result = CliRunner().invoke(main, ["push", str(sanitized), REPO, "--branch", "dev"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: push of {sanitized} to {REPO} failed")
    assert f"retry with: ckptops push {sanitized} {REPO} --branch dev" in lines[0]
    assert "local folder is intact" in lines[0] and "hf_secret_token" not in result.output
    assert digest(sanitized) == before


def test_private_push_refuses_an_existing_public_repo(sanitized, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    api = FakeApi(existing_private=False)
    with pytest.raises(HubError, match=f"{REPO}: exists and is public"):
        push_module.push(sanitized, REPO, private=True, api=api)
    assert "upload_folder" not in [name for name, _ in api.calls]


@pytest.mark.parametrize("args, needle", [
    (["not a repo"], "not a Hub repo id"),
    ([REPO, "--branch", "a..b"], "not a valid branch name"),
])
def test_bad_push_arguments(sanitized, args, needle):
    result = CliRunner().invoke(main, ["push", str(sanitized), *args, "--dry-run"])
    assert result.exit_code == 2 and needle in result.stderr


def test_push_refuses_a_folder_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["push", str(tmp_path / "empty"), REPO, "--dry-run"])
    assert result.exit_code == 1 and "empty" in result.stderr


def test_links_out_of_the_folder_are_neither_listed_nor_uploaded(sanitized, fake_api, tmp_path, monkeypatch):
    """The repo is public by default: ``notes.txt -> ~/.ssh/id_rsa`` must never go up."""
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    regular = sorted(p.name for p in sanitized.iterdir())
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET\n")
    (sanitized / "notes.txt").symlink_to(secret)
    (sanitized / "docs").mkdir()
    (sanitized / "docs" / "key[1]*.txt").symlink_to(secret)  # fnmatch characters in the name
    (sanitized / "docs" / "inside.txt").symlink_to(sanitized / "config.json")  # inside the folder: uploaded
    warnings = [f"warning: {sanitized / name}: is a symbolic link to {secret.resolve()}, outside the folder; "
                "it is not uploaded" for name in ("docs/key[1]*.txt", "notes.txt")]

    dry = CliRunner().invoke(main, ["push", str(sanitized), REPO, "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert sorted(f["path"] for f in plan["files"]) == sorted([*regular, "docs/inside.txt"])
    assert plan["skipped"] == [{"path": "docs/key[1]*.txt", "target": str(secret.resolve())},
                               {"path": "notes.txt", "target": str(secret.resolve())}]
    assert dry.stderr.splitlines() == warnings

    pushed = CliRunner().invoke(main, ["push", str(sanitized), REPO])
    assert pushed.exit_code == 0, pushed.output
    assert pushed.stderr.splitlines() == warnings
    assert sorted(fake_api.uploaded) == sorted([*regular, "docs/inside.txt"])
    assert not any(b"TOP SECRET" in data for data in fake_api.uploaded.values())


def test_a_needed_file_linking_out_is_refused_and_linked_weights_go_up(sanitized, fake_api, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    shard = sanitized / "model-00001-of-00003.safetensors"
    data = shard.read_bytes()
    elsewhere = tmp_path / "big-disk"
    elsewhere.mkdir()
    shard.rename(elsewhere / shard.name)
    shard.symlink_to(elsewhere / shard.name)  # users link big shards: weights, headers validated
    assert CliRunner().invoke(main, ["push", str(sanitized), REPO]).exit_code == 0
    assert fake_api.uploaded[shard.name] == data

    config = sanitized / "config.json"
    config.rename(elsewhere / "config.json")
    config.symlink_to(elsewhere / "config.json")
    fake_api.calls.clear()
    result = CliRunner().invoke(main, ["push", str(sanitized), REPO])
    assert result.exit_code == 1 and result.stderr.splitlines() == [
        f"error: {config}: is a symbolic link to {(elsewhere / 'config.json').resolve()}, outside the folder; the repo "
        "needs this file but ckptops uploads nothing from outside the folder (copy the file into the folder in place "
        "of the link)"]
    assert fake_api.calls == []
