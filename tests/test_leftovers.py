"""Leftover temporary folders of runs killed hard are removed; a live run's folder is reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ckptops
from ckptops.checkpoint.leftovers import OWNER_FILE

ROOT = Path(__file__).resolve().parents[1]


def _hold_a_staging_folder(out: Path) -> subprocess.Popen:
    """A process that creates a staging folder for ``out`` the way a run does and then waits."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from ckptops.checkpoint.publish import staging_folder\n"
        "with staging_folder(Path(sys.argv[1]), False) as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(b'x' * 1000)\n"
        "    print(tmp, flush=True)\n"
        "    time.sleep(600)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", code, str(out)], env=env, stdout=subprocess.PIPE, text=True)


def test_a_killed_runs_folder_is_removed_and_a_live_runs_is_reported(triple, tmp_path):
    paths, _ = triple
    out = tmp_path / "out"
    dead, live = _hold_a_staging_folder(out), _hold_a_staging_folder(out)
    try:
        dead_folder = Path(dead.stdout.readline().strip())
        live_folder = Path(live.stdout.readline().strip())
        assert json.loads((dead_folder / OWNER_FILE).read_text())["pid"] == dead.pid
        dead.send_signal(signal.SIGKILL)  # no chance to clean up
        dead.wait()
        assert dead_folder.is_dir()
        report = ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], out, progress=False)
        assert not dead_folder.exists()
        assert report.leftovers["removed"] == [str(dead_folder)]
        assert report.leftovers["removed_bytes"] >= 1000
        assert live_folder.is_dir() and report.leftovers["live"] == [str(live_folder)]
        assert "removed leftover" in report.format_text() and "still writing" in report.format_text()
        assert not (out / OWNER_FILE).exists()  # the owner file never reaches the output
    finally:
        for process in (dead, live):
            if process.poll() is None:
                process.kill()
                process.wait()


def test_a_folder_without_owner_is_removed_once_old(triple, tmp_path):
    paths, _ = triple
    out = tmp_path / "out"
    old = tmp_path / ".out.ckptops-tmp-0123abcd"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"y" * 10)
    past = time.time() - 3600
    os.utime(old, (past, past))
    report = ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], out, progress=False)
    assert not old.exists() and report.leftovers["removed"] == [str(old)]
