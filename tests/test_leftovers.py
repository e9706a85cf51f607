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


def _an_hour_old(path: Path) -> None:
    past = time.time() - 3600
    os.utime(path, (past, past), follow_symlinks=False)


def test_a_former_output_is_left_alone_while_out_is_missing(triple, tmp_path):
    """An --overwrite killed between its two renames leaves OUT missing and the old OUT only under
    the hidden name: possibly the user's only copy. A later run warns and names it, and keeps it."""
    import pytest

    paths, _ = triple
    out = tmp_path / "out"
    previous = tmp_path / ".out.ckptops-old-0123abcd"
    previous.mkdir()
    (previous / "MY_NOTES.txt").write_text("the previous result")
    _an_hour_old(previous)
    with pytest.warns(UserWarning, match=r"ckptops-old-0123abcd holds the previous .*out.* mv "):
        report = ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], out, progress=False)
    assert (previous / "MY_NOTES.txt").read_text() == "the previous result"
    assert report.leftovers["set_aside"] == [str(previous)] and report.leftovers["removed"] == []
    assert list(out.glob("*.safetensors"))  # the run itself went ahead


def test_a_replaced_output_beside_out_is_removed_and_a_symlink_only_unlinked(triple, tmp_path):
    """Beside an existing OUT, a former OUT whose deletion was cut short is removed; one that was
    a symlink to a folder is removed as a link, and the folder it points to stays intact."""
    paths, _ = triple
    out = tmp_path / "out"
    out.mkdir()
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("not ckptops' to delete")
    replaced = tmp_path / ".out.ckptops-old-0123abcd"
    replaced.mkdir()
    (replaced / "model.safetensors").write_bytes(b"z" * 10)
    link = tmp_path / ".out.ckptops-old-4567cdef"
    link.symlink_to("real")
    for path in (replaced, link):
        _an_hour_old(path)
    report = ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], out, progress=False, overwrite=True)
    assert sorted(report.leftovers["removed"]) == [str(replaced), str(link)]
    assert not os.path.lexists(replaced) and not os.path.lexists(link)
    assert (real / "keep.txt").read_text() == "not ckptops' to delete"


def test_overwriting_a_symlinked_out_leaves_no_link_behind(tmp_path):
    """--overwrite onto OUT that is a symlink to a folder: OUT becomes the new folder, the folder
    the link pointed to stays intact, and no ``.OUT.ckptops-old-*`` link is left."""
    from ckptops.checkpoint.publish import move_into_place

    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("not ckptops' to delete")
    out = tmp_path / "out"
    out.symlink_to("real")
    new = tmp_path / ".out.ckptops-tmp-0123abcd"
    new.mkdir()
    (new / "model.safetensors").write_bytes(b"new")
    move_into_place(new, out, True)
    assert not out.is_symlink() and (out / "model.safetensors").read_bytes() == b"new"
    assert (real / "keep.txt").read_text() == "not ckptops' to delete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real"]
