"""kill -9 at several points, then the same command with --resume: the output is byte for byte
that of an uninterrupted run, and a run killed after its shards were complete reuses them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptops.synth import Preset, write_triple

ROOT = Path(__file__).resolve().parents[1]
PRESET = Preset(128, 352, 4, 4, 2, 2000)


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    return write_triple(tmp_path_factory.mktemp("resume"), PRESET, shard_size=800_000)


def _command(triple, out: Path, *extra: str) -> list[str]:
    # --max-memory 340MiB: chunks of ~50k values, so the one-read pass samples and corrects
    return [sys.executable, "-m", "ckptops.cli", "sanitize", "--base", str(triple["base"]), "--harmful",
            str(triple["harmful"]), "--target", str(triple["target"]), "--out", str(out), "-q", "--json",
            "--max-memory", "340MiB", "--resume", *extra]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("CKPTOPS_PAUSE_AT", None)
    env.update(extra)
    return env


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(triple, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "out"
    result = subprocess.run(_command(triple, out), env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["one_read"]["groups"] == 1
    return _files(out)


@pytest.mark.parametrize("point", ["selection", "apply", "correction", "publish"])
def test_kill_9_then_resume_gives_the_same_bytes(triple, uninterrupted, tmp_path, point):
    out = tmp_path / "out"
    marker = tmp_path / "paused"
    process = subprocess.Popen(_command(triple, out), env=_env(CKPTOPS_PAUSE_AT=point, CKPTOPS_PAUSE_MARKER=str(marker)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), process.stderr.read().decode()[-2000:] if process.poll() is not None else "no pause"
    process.send_signal(signal.SIGKILL)
    process.wait()
    staged = [p for p in tmp_path.iterdir() if ".ckptops-tmp-" in p.name]
    assert len(staged) == 1 and not out.exists()

    result = subprocess.run(_command(triple, out), env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    got = _files(out)
    assert got.keys() == uninterrupted.keys()
    assert [n for n in got if got[n] != uninterrupted[n]] == []
    assert not [p for p in tmp_path.iterdir() if ".ckptops-" in p.name]  # the staging folder became OUT
    assert not report["leftovers"]["removed"]  # it was continued, not swept
    shards = sorted(n for n in got if n.endswith(".safetensors"))
    if point == "publish":  # the work was done: every shard reused, no input read
        assert report["resumed"]["reused_shards"] == shards
        assert all(v["read"] == 0 for v in report["io"].values())
    else:
        assert not report["resumed"]


def test_resume_does_not_continue_a_run_with_other_arguments(triple, tmp_path):
    out = tmp_path / "out"
    marker = tmp_path / "paused"
    process = subprocess.Popen(_command(triple, out, "--scale", "2"),
                               env=_env(CKPTOPS_PAUSE_AT="publish", CKPTOPS_PAUSE_MARKER=str(marker)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = subprocess.run(_command(triple, out), env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert not report["resumed"] and len(report["leftovers"]["removed"]) == 1  # swept, not reused
