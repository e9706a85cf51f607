"""kill -9 at several points of a run (started without --resume, as a user would), then the same
command with --resume: the output is byte for byte that of an uninterrupted run (every file,
ckptops.json, card and index included; and that run matches the independent in-memory
reference), the output shards the killed run finished are reused without reading their inputs
again, and anything that does not check out is computed again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptops.hdr.sanitize import SanitizeReport
from ckptops.synth import Preset, write_triple
from hdr_reference import bits_equal, load_folder, reference_hdr
from hub_server import hub  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
PRESET = Preset(128, 352, 4, 4, 2, 2000)
JOURNAL = ".ckptops-journal"
#: the killed run writes against an estimate at the band's lower edge, so that the corrections
#: rewrite values (with the sampled estimate they rewrite none on this model)
AT_THE_EDGE = (
    "import sys\n"
    "from ckptops.hdr import one_read\n"
    "sample = one_read.estimate_band\n"
    "def edge(*a, **k):\n"
    "    band = sample(*a, **k)\n"
    "    return one_read.Band(band.lo, band.size, band.lo)\n"
    "one_read.estimate_band = edge\n"
    "from ckptops.cli import console\n"
    "sys.argv[0] = 'ckptops'\n"
    "console()\n"
)


#: the sample misleads (a band far above the threshold): the pass misses, the group is selected
#: again with two passes and rewritten in place (the fallback)
MISLEADING = AT_THE_EDGE.replace(
    "    return one_read.Band(band.lo, band.size, band.lo)\n",
    "    far = band.lo + 40 * (1 << 23)\n"
    "    return one_read.Band(far, band.size, far + band.size // 2)\n")


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    return write_triple(tmp_path_factory.mktemp("resume"), PRESET, shard_size=800_000)


def _command(inputs, out: Path, *extra: str, resume: bool = True, edge: bool = False,
             script: str | None = None) -> list[str]:
    # --max-memory 340MiB: chunks of ~50k values, so the one-read pass samples and corrects;
    # --shard-size 300KB: 8 output shards of about 3 chunks each
    script = AT_THE_EDGE if edge else script
    start = [sys.executable, "-c", script] if script else [sys.executable, "-m", "ckptops.cli"]
    return [*start, "sanitize", "--base", str(inputs["base"]), "--harmful", str(inputs["harmful"]),
            "--target", str(inputs["target"]), "--out", str(out), "-q", "--json", "--max-memory", "340MiB",
            "--shard-size", "300KB", *(["--resume"] if resume else []), *extra]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("CKPTOPS_PAUSE_AT", None)
    env.update(extra)
    return env


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _run(command: list[str]) -> dict:
    result = subprocess.run(command, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _kill_at(command: list[str], point: str, tmp_path: Path) -> Path:
    """Run ``command`` until it pauses at ``point``, kill -9 it; its staging folder."""
    marker = tmp_path / f"paused-{point}"
    process = subprocess.Popen(command, env=_env(CKPTOPS_PAUSE_AT=point, CKPTOPS_PAUSE_MARKER=str(marker)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    failed = process.poll() is not None
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert marker.exists(), process.stderr.read().decode()[-2000:] if failed else "no pause"
    staged = [p for p in tmp_path.iterdir() if ".ckptops-tmp-" in p.name]
    assert len(staged) == 1
    return staged[0]


def _finished(staged: Path) -> list[str]:
    """The output shards the killed run journaled as finished."""
    return sorted(json.loads(p.read_text())["name"] for p in (staged / JOURNAL).glob("shard-*.json"))


def _data_bytes(folder: Path) -> dict[str, int]:
    """Bytes of every tensor of a checkpoint folder, from its headers."""
    sizes = {}
    for file in folder.glob("*.safetensors"):
        raw = file.read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        for name, info in header.items():
            if name != "__metadata__":
                sizes[name] = info["data_offsets"][1] - info["data_offsets"][0]
    return sizes


def _expected_reads(triple, out: Path, reused: list[str]) -> dict[str, int]:
    """Bytes each input must give a resumed run that reuses ``reused`` (and reads no sample):
    every tensor of every other output shard, once."""
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    wanted = [name for name, shard in index.items() if shard not in reused]
    return {role: sum(_data_bytes(triple[role])[name] for name in wanted) for role in ("base", "harmful", "target")}


def _same(out: Path, uninterrupted: dict[str, bytes], skip=()) -> None:
    got = _files(out)
    assert got.keys() == uninterrupted.keys()
    assert [n for n in got if got[n] != uninterrupted[n] and n not in skip] == []
    assert not (out / JOURNAL).exists()
    assert not [p for p in out.parent.iterdir() if ".ckptops-" in p.name]  # the staging folder became OUT


@pytest.fixture(scope="module")
def uninterrupted(triple, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "out"
    report = _run(_command(triple, out, resume=False))
    assert report["one_read"]["groups"] == 1 and not report["resumed"]
    assert not (out / JOURNAL).exists()
    states = {role: load_folder(path) for role, path in triple.items()}
    expected, _ = reference_hdr(states["base"], states["harmful"], states["target"])
    got = load_folder(out)
    assert got.keys() == expected.keys() and all(bits_equal(got[n], expected[n]) for n in expected)
    assert len(list(out.glob("*.safetensors"))) == 8
    return _files(out)


@pytest.mark.parametrize("point", ["selection", "apply", "correction", "publish"])
def test_kill_9_then_resume_gives_the_same_bytes(triple, uninterrupted, tmp_path, point):
    out = tmp_path / "out"
    staged = _kill_at(_command(triple, out, resume=point == "selection"), point, tmp_path)
    finished = _finished(staged)
    report = _run(_command(triple, out))
    _same(out, uninterrupted)
    assert not report["leftovers"]["removed"]  # it was continued, not swept
    shards = sorted(n for n in uninterrupted if n.endswith(".safetensors"))
    resumed = report["resumed"]
    assert resumed["reused_shards"] == finished and resumed["redone_shards"] == []
    if point == "selection":
        assert finished == []
    elif point == "apply":  # mid-pass: some shards finished, the rest computed now
        assert 0 < len(finished) < len(shards)
        assert f"reused {len(finished)} finished output shard(s)" in SanitizeReport(**report).format_text()
    else:  # the pass was done: every shard reused
        assert finished == shards
    # only the other shards' inputs are read, once: no shard twice, no sample again (the band
    # comes from the journal)
    reads = {role: v["read"] for role, v in report["io"].items()}
    assert reads == _expected_reads(triple, out, finished)
    assert resumed["input_bytes_skipped"] == sum(_expected_reads(triple, out, []).values()) - sum(reads.values())


def test_kill_during_the_corrections(triple, uninterrupted, tmp_path):
    """Killed with part of the corrections written over finished shards: the resumed run writes
    the pass's values back before it checks the shards (all reused, nothing read), then
    corrects them again."""
    out = tmp_path / "out"
    staged = _kill_at(_command(triple, out, resume=False, edge=True), "patch", tmp_path)
    assert json.loads((staged / JOURNAL / "journal.json").read_text())["phase"] == "correcting"
    report = _run(_command(triple, out))
    _same(out, uninterrupted)
    assert report["resumed"]["reused_shards"] == sorted(n for n in uninterrupted if n.endswith(".safetensors"))
    assert all(v["read"] == 0 for v in report["io"].values())
    assert report["one_read"]["values_corrected"] > 100


def test_a_shard_damaged_after_the_kill_is_computed_again(triple, uninterrupted, tmp_path):
    out = tmp_path / "out"
    staged = _kill_at(_command(triple, out, resume=False), "publish", tmp_path)
    finished = _finished(staged)
    damaged = finished[2]
    with open(staged / damaged, "r+b") as file:
        file.seek(-100, os.SEEK_END)
        byte = file.read(1)
        file.seek(-100, os.SEEK_END)
        file.write(bytes([byte[0] ^ 0x40]))
    report = _run(_command(triple, out))
    _same(out, uninterrupted)
    assert report["resumed"]["redone_shards"] == [damaged]
    assert report["resumed"]["reused_shards"] == [n for n in finished if n != damaged]
    assert {role: v["read"] for role, v in report["io"].items()} == _expected_reads(
        triple, out, report["resumed"]["reused_shards"])


def test_two_pass_resumes_mid_pass(triple, uninterrupted, tmp_path):
    """--two-pass journals the selected thresholds: the resumed run selects nothing again and
    computes only the shards the killed run did not finish."""
    out = tmp_path / "out"
    staged = _kill_at(_command(triple, out, "--two-pass", resume=False), "apply", tmp_path)
    finished = _finished(staged)
    assert finished
    report = _run(_command(triple, out, "--two-pass"))
    _same(out, uninterrupted)
    assert report["resumed"]["reused_shards"] == finished
    assert {role: v["read"] for role, v in report["io"].items()} == _expected_reads(triple, out, finished)


def test_resume_does_not_continue_a_run_with_other_arguments(triple, uninterrupted, tmp_path):
    out = tmp_path / "out"
    staged = _kill_at(_command(triple, out, "--scale", "2", resume=False), "apply", tmp_path)
    assert _finished(staged)
    report = _run(_command(triple, out))
    _same(out, uninterrupted)
    assert not report["resumed"] and report["leftovers"]["removed"] == [str(staged)]  # swept, not reused


def test_without_resume_a_killed_run_is_removed(triple, uninterrupted, tmp_path):
    out = tmp_path / "out"
    staged = _kill_at(_command(triple, out, resume=False), "apply", tmp_path)
    report = _run(_command(triple, out, resume=False))
    _same(out, uninterrupted)
    assert not report["resumed"] and report["leftovers"]["removed"] == [str(staged)]
    assert report["io"]["target"]["read"] == sum(_data_bytes(triple["target"]).values())


def test_layer_scope_resumes_mid_pass(triple, tmp_path):
    """Layer scope: a band per decoder layer, and the small groups outside the layers selected
    before the pass (journaled too: the resumed run reads nothing for them)."""
    plain = _run(_command(triple, tmp_path / "plain" / "out", "--scope", "layer", resume=False))  # same title
    assert plain["one_read"]["groups"] == 4 and plain["one_read"]["selected_before"]
    out = tmp_path / "out"
    staged = _kill_at(_command(triple, out, "--scope", "layer", resume=False), "apply", tmp_path)
    finished = _finished(staged)
    assert finished
    report = _run(_command(triple, out, "--scope", "layer"))
    _same(out, _files(tmp_path / "plain" / "out"))
    assert report["resumed"]["reused_shards"] == finished
    assert {role: v["read"] for role, v in report["io"].items()} == _expected_reads(triple, out, finished)


def test_resume_with_low_disk(triple, uninterrupted, tmp_path):
    """--low-disk (not part of the key) walks the rest of the plan in release units."""
    out = tmp_path / "out"
    finished = _finished(_kill_at(_command(triple, out, resume=False), "apply", tmp_path))
    report = _run(_command(triple, out, "--low-disk"))
    _same(out, uninterrupted)
    assert report["resumed"]["reused_shards"] == finished
    assert {role: v["read"] for role, v in report["io"].items()} == _expected_reads(triple, out, finished)


def test_hub_inputs_are_not_downloaded_again_for_finished_shards(hub, triple, uninterrupted, tmp_path):
    """The motivation: a long run from the Hub, killed, resumed. Input shards that only finished
    output shards need are not downloaded again."""
    refs = {role: f"org/{role}" for role in ("base", "harmful", "target")}
    for role, ref in refs.items():
        hub.add_folder(ref, triple[role])
    out = tmp_path / "out"
    finished = _finished(_kill_at(_command(refs, out, "--low-disk", resume=False), "apply", tmp_path))
    assert finished
    report = _run(_command(refs, out, "--low-disk"))
    _same(out, uninterrupted, skip=("README.md", "ckptops.json"))  # they name the Hub inputs
    assert report["resumed"]["reused_shards"] == finished
    full = sum(p.stat().st_size for p in triple["target"].glob("*.safetensors"))
    assert 0 < report["io"]["target"]["downloaded"] < full


@pytest.mark.parametrize("extra", [("--two-pass",), ("--scope", "tensor")])
def test_low_disk_passes_resume_mid_pass(triple, tmp_path, extra):
    """--low-disk outside the one-read pass (the global two-pass select, tensor scope) journals
    each unit's thresholds before writing: a run killed mid-pass is continued from its finished
    shards, and the result is the uninterrupted run's, byte for byte."""
    plain = tmp_path / "plain" / "out"
    _run(_command(triple, plain, "--low-disk", *extra, resume=False))
    out = tmp_path / "out"
    staged = _kill_at(_command(triple, out, "--low-disk", *extra, resume=False), "apply", tmp_path)
    finished = _finished(staged)
    assert finished
    report = _run(_command(triple, out, "--low-disk", *extra))
    _same(out, _files(plain))
    assert report["resumed"]["reused_shards"] == finished
    # the finished shards' target tensors are not read again (base/harmful: the remaining
    # tensors' selection reads them as well)
    assert report["io"]["target"]["read"] == _expected_reads(triple, out, finished)["target"]


def test_kill_during_the_band_miss_fallback(triple, uninterrupted, tmp_path):
    """A kill while the fallback rewrites a missed group in place: the resumed run reuses the
    shards the fallback had not touched yet, computes the others again, runs the fallback again,
    and gives the uninterrupted bytes."""
    out = tmp_path / "out"
    staged = _kill_at(_command(triple, out, resume=False, script=MISLEADING), "fallback", tmp_path)
    journaled = _finished(staged)
    assert len(journaled) == 8
    report = _run(_command(triple, out, script=MISLEADING))
    _same(out, uninterrupted)
    assert report["one_read"]["band_missed"] == ["all"]
    reused = report["resumed"]["reused_shards"]
    assert reused and len(reused) < 8 and report["resumed"]["redone_shards"]


def _tamper_and_resume(triple, uninterrupted, tmp_path, name: str, field: str, value) -> tuple[dict, dict, list]:
    """Stop a run just before its publish, set ``field`` of the journal file ``name`` to
    ``value``, resume, and check the output is the uninterrupted run's. Returns the resumed
    run's report, the journal file as it was, and the shards finished before the stop."""
    out = tmp_path / "out"
    staged = _kill_at(_command(triple, out, resume=False), "publish", tmp_path)
    finished = _finished(staged)
    path = staged / JOURNAL / name
    original = json.loads(path.read_text())
    path.write_text(json.dumps(dict(original, **{field: value})))
    report = _run(_command(triple, out))
    _same(out, uninterrupted)
    return report, original, finished


@pytest.mark.parametrize("field, value", [
    ("size", "12"),
    ("kept", {"a": "b"}),
    ("checksum", 12),
    ("hists", {"all": ["1", 2]}),
    ("peaks", {"a": 1.5}),
    ("records", {"count": 1, "bytes": "3", "checksum": "x"}),
    ("drift", {"layer 0": {"parts": [["a", "0", "k", [0, 0, 0, 0, 0]]], "sums": {}, "counts": {}}}),
])
def test_a_journal_entry_of_the_wrong_types_is_computed_again(triple, uninterrupted, tmp_path, field, value):
    """A shard entry whose value has another type than this version writes is a damaged entry:
    that shard is computed again (it was a TypeError traceback)."""
    report, entry, finished = _tamper_and_resume(triple, uninterrupted, tmp_path, "shard-00001.json", field, value)
    assert report["resumed"]["redone_shards"] == [entry["name"]]
    assert report["resumed"]["reused_shards"] == [n for n in finished if n != entry["name"]]


@pytest.mark.parametrize("field, value", [
    ("bands", {"all": ["0", 1, 2, 3]}),
    ("phase", 3),
    ("preselected", {"other": [0.5, "1", 2]}),
])
def test_a_journal_state_of_the_wrong_types_starts_over(triple, uninterrupted, tmp_path, field, value):
    report, _, _ = _tamper_and_resume(triple, uninterrupted, tmp_path, "journal.json", field, value)
    assert report["resumed"]["reused_shards"] == []
    assert report["io"]["target"]["read"] == sum(_data_bytes(triple["target"]).values())  # all computed again


#: every run (killed, resumed and fresh) identifies an input by its shard names alone, as a
#: sampled fingerprint does when an edit falls between its windows (the test files are smaller
#: than the 16 windows, which would see any edit)
BLIND_FINGERPRINT = (
    "import sys, hashlib\n"
    "from ckptops.hdr import sanitize\n"
    "sanitize.fingerprint = lambda ckpt, *a, **k: hashlib.sha256(' '.join(sorted(ckpt.shards)).encode()).hexdigest()\n"
    "from ckptops.cli import console\n"
    "sys.argv[0] = 'ckptops'\n"
    "console()\n"
)


def test_an_input_changed_after_the_kill_starts_over(triple, tmp_path):
    """An input edited in place (same size, a value the finished shards used changed) where the
    sampled fingerprint does not look: the size and modification time of every local input
    file are part of the resume key, so the killed run's shards are not reused."""
    import shutil

    inputs = {role: tmp_path / "in" / role for role in triple}
    for role, path in triple.items():
        shutil.copytree(path, inputs[role])
    out = tmp_path / "out"
    staged = _kill_at(_command(inputs, out, resume=False, script=BLIND_FINGERPRINT), "apply", tmp_path)
    finished = _finished(staged)
    assert finished
    # change the first value of a tensor of the first finished output shard, in the target
    index = json.loads((staged / finished[0]).read_bytes()[8:8 + int.from_bytes(
        (staged / finished[0]).read_bytes()[:8], "little")])
    tensor = next(name for name in index if name != "__metadata__")
    for file in sorted(inputs["target"].glob("*.safetensors")):
        raw = file.read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        if tensor in header:
            before = file.stat()
            offset = 8 + int.from_bytes(raw[:8], "little") + header[tensor]["data_offsets"][0]
            with open(file, "r+b") as handle:
                handle.seek(offset)
                handle.write(bytes([raw[offset] ^ 0x40, raw[offset + 1] ^ 0x01]))
            assert file.stat().st_size == before.st_size and file.stat().st_mtime_ns != before.st_mtime_ns
            break
    else:
        raise AssertionError(f"{tensor} is in no target file")
    result = subprocess.run(_command(inputs, out, script=BLIND_FINGERPRINT), env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "warning: --resume: nothing to continue" in result.stderr, result.stderr  # said, not silent
    assert "inputs, their files or the settings differ" in result.stderr
    fresh = tmp_path / "fresh" / "out"
    _run(_command(inputs, fresh, resume=False, script=BLIND_FINGERPRINT))
    _same(out, _files(fresh))
    assert not report["resumed"] and report["leftovers"]["removed"] == [str(staged)]  # swept, not reused
