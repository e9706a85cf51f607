"""Every command that runs a model takes ``--threads`` and sets torch's threads to it before the
model loads (issue 10, item 3); the default is the free cores."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from ckptops.cli import main

MODEL_COMMANDS = [["eval"], ["generate"], ["icv", "compute"], ["run"], ["harm", "make"], ["tune"]]


@pytest.mark.parametrize("command", MODEL_COMMANDS, ids=" ".join)
def test_every_model_command_documents_threads(command):
    result = CliRunner().invoke(main, command + ["--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "--threads N" in text and "free cores" in text


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_are_set_before_the_model_loads(tmp_path, monkeypatch, threads):
    import ckptops.icv.load as load_module
    from ckptops.errors import CheckpointError

    seen = {}

    def fake_load(*args, **kwargs):
        seen["threads"] = torch.get_num_threads()
        raise CheckpointError("stop here")

    monkeypatch.setattr(load_module, "load_model", fake_load)
    before = torch.get_num_threads()
    try:
        model = tmp_path / "m"
        model.mkdir()
        result = CliRunner().invoke(main, ["generate", "--model", str(model), "--no-icv", "--prompt", "hi",
                                           "--threads", str(threads)])
        assert "stop here" in result.output, result.output
        assert seen["threads"] == threads
    finally:
        torch.set_num_threads(before)


def test_default_threads_counts_free_cores(monkeypatch):
    import os

    from ckptops.threads import default_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.5, 0.0, 0.0))
    assert default_threads() == 2  # int(8 - 5.5)
    monkeypatch.setattr(os, "getloadavg", lambda: (12.0, 0.0, 0.0))
    assert default_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert default_threads() == 8


def test_threads_below_one_is_refused():
    result = CliRunner().invoke(main, ["generate", "--model", "x/y", "--no-icv", "--prompt", "hi", "--threads", "0"])
    assert result.exit_code == 2 and "--threads must be at least 1" in result.output
