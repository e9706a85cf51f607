"""Messages about the output name the user's folder and say what to do (issue class 6): a full
disk, a concurrent run that created OUT first, ``--out .``; OUT is never damaged and no temporary
folder is left."""

from __future__ import annotations

import errno
import json
import os

import pytest
from click.testing import CliRunner

from ckptops.cli import main
from conftest import CONFIG, llama_state, write_folder


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    root = tmp_path_factory.mktemp("outmsg")
    base = llama_state(0)
    paths = {}
    for role, state in (("base", base), ("harmful", llama_state(1, base=base, delta=0.01)),
                        ("target", llama_state(2, base=base, delta=0.01))):
        paths[role] = write_folder(root / role, state)
        (root / role / "config.json").write_text(json.dumps(CONFIG))
    return paths


def _sanitize(triple, out, *extra):
    return CliRunner().invoke(main, ["sanitize", "--base", str(triple["base"]), "--harmful", str(triple["harmful"]),
                                     "--target", str(triple["target"]), "--out", str(out), "-q", *extra])


def _one_line(result, *needles):
    assert result.exit_code == 1, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _no_temp(folder):
    assert not [p.name for p in folder.iterdir() if ".ckptops-" in p.name]


@pytest.mark.parametrize("direct", [True, False])
def test_disk_full_names_the_output_and_leaves_it_unchanged(triple, tmp_path, monkeypatch, direct):
    from ckptops.checkpoint import writer as writer_module

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous result")

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer_module.os, "pwrite", full)
    if not direct:
        monkeypatch.delattr(writer_module.os, "O_DIRECT", raising=False)
    line = _one_line(_sanitize(triple, out, "--overwrite"), str(out), "no space left", "choose another --out")
    assert "ckptops-tmp" not in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    _no_temp(tmp_path)


def test_losing_a_concurrent_run_says_what_happened(triple, tmp_path, monkeypatch):
    from ckptops.checkpoint import publish

    out = tmp_path / "out"
    real_release = publish.release

    def other_run_finishes_first(tmp):
        real_release(tmp)
        out.mkdir()
        (out / "model.safetensors").write_text("the other run's result")

    monkeypatch.setattr(publish, "release", other_run_finishes_first)
    _one_line(_sanitize(triple, out), str(out), "another run", "discarded", "--overwrite")
    assert (out / "model.safetensors").read_text() == "the other run's result"
    _no_temp(tmp_path)


@pytest.mark.parametrize("where", [".", "..", "~"])
def test_out_dot_is_refused_with_a_hint(triple, tmp_path, monkeypatch, where):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = sorted(os.listdir(work))
    _one_line(_sanitize(triple, where, "--overwrite"), f"--out {where}" if where != "~" else "--out", "name a new folder")
    assert sorted(os.listdir(work)) == before
