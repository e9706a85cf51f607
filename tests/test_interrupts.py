"""Ctrl-C and worker failures end a run promptly, with one line, exit 130 and nothing left behind.

The class of failure: a worker thread blocked on the output writer (waiting for a free staging
block) while the main thread, interrupted, closes the writer and then waits for the worker: the
run hung for ever. The CLI test interrupts a real ``sanitize`` run of about a second at many
points (start-up imports, selection, apply/write, publish); the unit test forces the blocked
worker deterministically with a slow disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    from ckptops.synth import Preset, write_triple

    root = tmp_path_factory.mktemp("sigint")
    # about 250 MB per model: a float32-output sanitize takes about a second
    return write_triple(root, Preset(1024, 2816, 8, 8, 4, 16000))


def _start(triple, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("CKPTOPS_DEBUG", None)
    args = [sys.executable, "-m", "ckptops.cli", "sanitize", "--base", str(triple["base"]),
            "--harmful", str(triple["harmful"]), "--target", str(triple["target"]),
            "--out", str(out), "-q", "--dtype", "float32"]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".ckptops-" in p.name]


def test_sigint_at_many_points_ends_promptly_with_130_and_no_leftovers(triple, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "out"
    started = time.perf_counter()
    probe = _start(triple, out)
    probe.communicate(timeout=120)
    whole = time.perf_counter() - started
    assert probe.returncode == 0
    import shutil

    shutil.rmtree(out)
    # from the moment the interpreter itself is up (a SIGINT inside Python's own start-up, before
    # any ckptops code runs, is Python's to report) to the end of the run
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
    bare = time.perf_counter() - started
    failures = []
    early = 0
    delays = [bare + (whole - bare) * f for f in np.linspace(0.0, 1.0, 10)]
    for delay in delays:
        process = _start(triple, out)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        try:
            _, err = process.communicate(timeout=max(10.0, 3 * whole))
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            failures.append(f"{delay:.2f}s: still running {max(10.0, 3 * whole):.0f} s after SIGINT")
            shutil.rmtree(out, ignore_errors=True)
            for name in _leftovers(tmp_path):
                shutil.rmtree(tmp_path / name, ignore_errors=True)
            continue
        lines = err.decode("utf-8", "replace").strip().splitlines()
        left = _leftovers(tmp_path)
        if process.returncode == 0:  # the signal came after the work was done: a complete output
            with safe_open(str(out / "model.safetensors"), "pt") as f:
                assert len(list(f.keys())) == 75
            shutil.rmtree(out)
        elif process.returncode != 130 and _before_ckptops(process.returncode, lines):
            early += 1  # Python's own start-up (stdlib imports before ckptops' first line): not ours
        elif process.returncode != 130:
            failures.append(f"{delay:.2f}s: exit {process.returncode}, stderr {lines[-3:]}")
        elif lines == [f"error: interrupted after {out} was written complete; it is kept"]:
            with safe_open(str(out / "model.safetensors"), "pt") as f:  # after the publish: complete
                assert len(list(f.keys())) == 75
            shutil.rmtree(out)
        elif lines != [f"error: interrupted; {out} unchanged"]:
            failures.append(f"{delay:.2f}s: stderr {lines[-3:]}")
        elif out.exists():
            failures.append(f"{delay:.2f}s: {out} was created")
        if left:
            failures.append(f"{delay:.2f}s: left {left}")
            for name in left:
                shutil.rmtree(tmp_path / name, ignore_errors=True)
    assert not failures, "\n".join(failures)
    assert early <= 2, f"{early} of {len(delays)} interrupts landed before ckptops' code ran: the test measured nothing"


def _before_ckptops(returncode: int, lines: list[str]) -> bool:
    """The signal came before ckptops could handle it (on a loaded machine start-up can outlast
    `python -c pass`): killed by SIGINT before Python installed its own handler, or a
    KeyboardInterrupt traceback whose only ckptops frames are the package's ``__init__`` before
    its start-up guard. (Once the guard is in place a Ctrl-C is one line and exit 130, never a
    traceback; frames of site-packages files that merely have "ckptops" in their name, such as an
    editable install's import finder, are Python's start-up too.)"""
    if returncode == -signal.SIGINT and not any(_ckptops_frame(line) for line in lines):
        return True
    frames = [line for line in lines if _ckptops_frame(line)]
    return bool(lines) and lines[-1] == "KeyboardInterrupt" and all(_before_guard(line) for line in frames)


def _before_guard(frame: str) -> bool:
    """A frame of code that runs before ckptops installs its start-up guard: ``ckptops/__init__.py``
    up to the guard, and ``ckptops/_startup.py``'s module body (its own imports), which
    ``__init__`` runs to get the guard."""
    path = frame.split('"')[1]
    if path.endswith(os.path.join("ckptops", "__init__.py")):
        return True
    return path.endswith(os.path.join("ckptops", "_startup.py")) and frame.rstrip().endswith("in <module>")


def _ckptops_frame(line: str) -> bool:
    """A traceback line ``File ".../ckptops/<module>.py", ...`` of ckptops' own code."""
    stripped = line.strip()
    return stripped.startswith('File "') and f"{os.sep}ckptops{os.sep}" in stripped.split('"')[1]


def test_close_wakes_a_worker_blocked_on_a_slow_disk(tmp_path, monkeypatch):
    """A worker waiting for a free staging block gets an error when the run gives up, and
    closing the file returns, even while the disk is still busy."""
    from ckptops.checkpoint import writer as writer_module
    from ckptops.checkpoint.writer import OutShard, OutTensor, ShardWriter

    real_pwrite = os.pwrite

    def slow_pwrite(fd, data, offset):
        time.sleep(0.05)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", slow_pwrite)
    count = 64 << 20  # 256 MiB of float32: far more than the staging blocks hold
    shard = OutShard("model.safetensors", [OutTensor("w", "F32", (count,))])
    writer = ShardWriter(tmp_path, [shard], {})
    chunk = np.ones(1 << 20, dtype=np.float32)
    outcome = {}

    def worker():
        try:
            for i in range(count // len(chunk)):
                writer.write("w", i * chunk.nbytes, chunk)
            outcome["result"] = "finished"
        except Exception as exc:  # noqa: BLE001 - the point is which exception
            outcome["result"] = exc

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    time.sleep(0.3)  # the worker fills the staging blocks and waits for the slow disk
    started = time.perf_counter()
    writer.close()  # what a failed or interrupted run does
    thread.join(5)
    assert not thread.is_alive(), "the worker is still blocked on the writer"
    assert time.perf_counter() - started < 5
    assert isinstance(outcome.get("result"), Exception), outcome
    assert "abandoned" in str(outcome["result"])


def test_an_interrupt_after_the_output_is_in_place_says_it_is_kept(tmp_path, monkeypatch):
    """Ctrl-C while the summary is still being made, after OUT was moved into place: OUT is
    complete, and the message must not claim it is unchanged (exit 130 all the same)."""
    from click.testing import CliRunner
    from safetensors import safe_open

    from ckptops.cli import main
    from ckptops.synth import PRESETS, write_triple

    folders = write_triple(tmp_path / "models", PRESETS["tiny"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ckptops.hdr.sanitize.push_output", interrupted)  # the step right after the publish
    out = tmp_path / "out"
    args = ["sanitize", "--base", str(folders["base"]), "--harmful", str(folders["harmful"]),
            "--target", str(folders["target"]), "--out", str(out), "-q"]
    monkeypatch.setattr(sys, "argv", ["ckptops", *args])  # the message names --out from the command line
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines() == [f"error: interrupted after {out} was written complete; it is kept"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) > 0
    assert not [p.name for p in tmp_path.iterdir() if ".ckptops-" in p.name]


def test_start_up_interrupts_are_told_from_ckptops_own():
    editable = ['Traceback (most recent call last):', '  File "<frozen site>", line 186, in addpackage',
                '  File "/venv/site-packages/__editable___ckptops_0_1_0_finder.py", line 7, in <module>',
                '    from pathlib import Path', 'KeyboardInterrupt']
    package_init = ['Traceback (most recent call last):', '  File "<frozen runpy>", line 112, in _get_module_details',
                    f'  File "{os.sep}repo{os.sep}ckptops{os.sep}__init__.py", line 12, in <module>',
                    '    from ckptops import _startup', 'KeyboardInterrupt']
    ours = package_init[:3] + [f'  File "{os.sep}repo{os.sep}ckptops{os.sep}hdr{os.sep}engine.py", line 9, in run',
                               'KeyboardInterrupt']
    assert _before_ckptops(1, editable) and _before_ckptops(1, package_init)
    assert _before_ckptops(-signal.SIGINT, []) and _before_ckptops(-signal.SIGINT, editable)
    assert not _before_ckptops(1, ours) and not _before_ckptops(-signal.SIGINT, ours)
    assert not _before_ckptops(1, ["error: something else"])
    # _startup's own imports run before the guard exists; its functions run after (the guard's)
    startup_body = package_init[:3] + [f'  File "{os.sep}repo{os.sep}ckptops{os.sep}_startup.py", line 16, in <module>',
                                       '    from typing import Callable', 'KeyboardInterrupt']
    startup_function = package_init[:3] + [
        f'  File "{os.sep}repo{os.sep}ckptops{os.sep}_startup.py", line 90, in release', 'KeyboardInterrupt']
    assert _before_ckptops(-signal.SIGINT, startup_body) and not _before_ckptops(1, startup_function)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ckptops.synth import PRESETS, write_triple

    return write_triple(tmp_path_factory.mktemp("tiny"), PRESETS["tiny"])


def _sanitize_args(tiny, out: Path) -> list[str]:
    return ["sanitize", "--base", str(tiny["base"]), "--harmful", str(tiny["harmful"]),
            "--target", str(tiny["target"]), "--out", str(out), "-q"]


def _old_output(out: Path) -> None:
    """An existing OUT the user cares about, told apart from any output ckptops writes."""
    out.mkdir()
    (out / "MY_NOTES.txt").write_text("the previous result")


def _interrupt_after_rename(monkeypatch, moved: str) -> None:
    """Ctrl-C arriving during the rename whose destination (or source) names ``moved``: Python
    raises it as the rename returns, with the rename done."""
    from ckptops.checkpoint import publish

    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        real_rename(src, dst, *args, **kwargs)
        if moved in os.fspath(dst) or moved in os.fspath(src):
            raise KeyboardInterrupt

    monkeypatch.setattr(publish.os, "rename", rename)


def test_an_interrupt_between_the_overwrite_renames_puts_the_old_output_back(tiny, tmp_path, monkeypatch):
    """Ctrl-C after OUT was renamed aside and before the new folder took its name: the old OUT
    goes back in place, the message says it is unchanged, and nothing is left beside it."""
    from click.testing import CliRunner

    from ckptops.cli import main

    out = tmp_path / "out"
    _old_output(out)
    _interrupt_after_rename(monkeypatch, ".ckptops-old-")
    args = _sanitize_args(tiny, out) + ["--overwrite"]
    monkeypatch.setattr(sys, "argv", ["ckptops", *args])  # the message names --out from the command line
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines() == [f"error: interrupted; {out} unchanged"]
    assert sorted(p.name for p in out.iterdir()) == ["MY_NOTES.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_interrupt_as_the_new_output_takes_its_name_says_it_is_kept(tiny, tmp_path, monkeypatch):
    """Ctrl-C during the rename that puts the new folder in place: that rename is done, so OUT is
    the new, complete output, the message says so, and the old one is deleted all the same."""
    from click.testing import CliRunner
    from safetensors import safe_open

    from ckptops.cli import main

    out = tmp_path / "out"
    _old_output(out)
    _interrupt_after_rename(monkeypatch, ".ckptops-tmp-")
    args = _sanitize_args(tiny, out) + ["--overwrite"]
    monkeypatch.setattr(sys, "argv", ["ckptops", *args])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines() == [f"error: interrupted after {out} was written complete; it is kept"]
    assert not (out / "MY_NOTES.txt").exists()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 39
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_interrupt_while_the_old_output_is_deleted_says_the_new_one_is_kept(tiny, tmp_path, monkeypatch):
    """Ctrl-C while the replaced OUT is being deleted: the new OUT is in place and complete, the
    message says it is kept, and a later run removes the old copy that was left."""
    import shutil

    from click.testing import CliRunner

    import ckptops
    from ckptops.checkpoint import publish
    from ckptops.cli import main

    out = tmp_path / "out"
    _old_output(out)
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if ".ckptops-old-" in os.fspath(path):
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(publish.shutil, "rmtree", rmtree)
    args = _sanitize_args(tiny, out) + ["--overwrite"]
    monkeypatch.setattr(sys, "argv", ["ckptops", *args])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines() == [f"error: interrupted after {out} was written complete; it is kept"]
    assert (out / "model.safetensors").is_file() and not (out / "MY_NOTES.txt").exists()
    [old] = [p for p in tmp_path.iterdir() if ".ckptops-old-" in p.name]
    assert (old / "MY_NOTES.txt").is_file()
    monkeypatch.undo()
    past = time.time() - 3600  # an earlier run's leftover, not one being deleted right now
    os.utime(old, (past, past))
    report = ckptops.sanitize(tiny["base"], tiny["harmful"], tiny["target"], out, progress=False, overwrite=True)
    assert report.leftovers["removed"] == [str(old)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _cli_with_hook(hook: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run the ``ckptops`` console entry point in a subprocess after ``hook`` (Python code)."""
    code = ("import os, signal, sys, weakref\n"
            "sys.argv = ['ckptops'] + sys.argv[1:]  # the CLI's own process: its Ctrl-C handlers are installed\n"
            f"{hook}\n"
            "from ckptops.cli import console\n"
            "console()\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("CKPTOPS_DEBUG", None)
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120, check=False)


def test_an_interrupt_python_drops_in_a_callback_still_ends_the_command_with_one_line(tiny, tmp_path):
    """A Ctrl-C whose KeyboardInterrupt lands in a weakref callback (or a __del__) is dropped by
    Python with an 'Exception ignored' traceback: the command must still end as interrupted."""
    out = tmp_path / "out"
    hook = ("from ckptops import _startup\n"
            "recorded = _startup.published\n"
            "class Thing: pass\n"
            "def ctrl_c(ref): os.kill(os.getpid(), signal.SIGINT)\n"
            "def published(path):\n"
            "    recorded(path)\n"
            "    thing = Thing(); published.ref = weakref.ref(thing, ctrl_c); del thing  # the callback runs here\n"
            "_startup.published = published\n")
    done = _cli_with_hook(hook, _sanitize_args(tiny, out))
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines() == [f"error: interrupted after {out} was written complete; it is kept"]
    assert (out / "model.safetensors").is_file()


def test_an_interrupt_after_the_command_ended_is_ignored(tiny, tmp_path):
    """Ctrl-C right after the command printed its last line: the work is done, so the exit code
    stays the command's, with no second message and no traceback."""
    hook = ("from ckptops import cli\n"
            "invoke = cli._Group.invoke\n"
            "def invoke_then_ctrl_c(self, ctx):\n"
            "    try:\n"
            "        return invoke(self, ctx)\n"
            "    finally:\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "        sum(range(1000))  # Python code for the signal handler to run in\n"
            "cli._Group.invoke = invoke_then_ctrl_c\n")
    out = tmp_path / "out"
    done = _cli_with_hook(hook, _sanitize_args(tiny, out))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith(f"wrote {out}")
    failed = _cli_with_hook(hook, ["inspect", str(tmp_path / "missing")])
    assert failed.returncode == 1
    assert len(failed.stderr.strip().splitlines()) == 1 and failed.stderr.startswith("error: "), failed.stderr
