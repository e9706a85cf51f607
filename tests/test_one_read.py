"""Global and layer scope in one read: exact output (bit for bit against the in-memory
reference), every input byte read once plus the sample, corrections spilled to disk, and the
fallback when the sampled band misses."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import torch

import ckptops
from ckptops.synth import Preset, write_triple
from hdr_reference import bits_equal, load_folder, reference_hdr

pytestmark = pytest.mark.usefixtures("engine_path")

#: about 1.3M parameters, 4 shards per model: the 1/64 sample holds ~20k values
PRESET = Preset(128, 352, 4, 4, 2, 2000)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("oneread")
    paths = write_triple(root, PRESET, shard_size=800_000)
    return paths, {role: load_folder(path) for role, path in paths.items()}


def _check(out: Path, expected: dict) -> None:
    got = load_folder(out)
    assert set(got) == set(expected)
    bad = [n for n in expected if not bits_equal(got[n], expected[n])]
    assert not bad, f"differs from the reference: {bad[:5]}"


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("dtype", [None, "float32"])
def test_one_read_matches_the_reference(models, tmp_path, scope, dtype):
    paths, states = models
    report = ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], tmp_path / "out", scope=scope,
                              dtype=dtype, chunk_elements=4096, progress=False)
    expected, thresholds = reference_hdr(states["base"], states["harmful"], states["target"], scope=scope,
                                         out_dtype=torch.float32 if dtype else None)
    _check(tmp_path / "out", expected)
    assert report.thresholds == thresholds
    one = report.one_read
    assert one["groups"] >= 1 and not one["band_missed"] and one["corrections_recorded"] > 0
    assert "one read" in report.format_text()


@pytest.mark.parametrize("side", ["below", "above"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_values_written_against_a_wrong_estimate_are_corrected(models, tmp_path, monkeypatch, side, scope):
    """The pass writes against an estimate at one edge of the band: every in-band value on the
    wrong side of the exact threshold (selected when it must not be, or the reverse) is rewritten."""
    from ckptops.hdr import one_read

    original = one_read.estimate_band

    def at_the_edge(*args, **kwargs):
        band = original(*args, **kwargs)
        return one_read.Band(band.lo, band.size, band.lo if side == "below" else band.lo + band.size - 1)

    monkeypatch.setattr(one_read, "estimate_band", at_the_edge)
    paths, states = models
    report = ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], tmp_path / "out", scope=scope,
                              chunk_elements=4096, progress=False)
    expected, _ = reference_hdr(states["base"], states["harmful"], states["target"], scope=scope)
    _check(tmp_path / "out", expected)
    one = report.one_read
    assert not one["band_missed"] and one["values_corrected"] > 100
    _same_drift(report, paths, tmp_path, scope)


def _same_drift(report, paths, tmp_path, scope="global") -> None:
    """The drift figures (sums over the exact selection) equal those of the two-pass engine."""
    two = ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], tmp_path / "two-pass", scope=scope,
                           chunk_elements=4096, progress=False, one_read=False)
    for key, figures in two.drift.layers.items():
        got = report.drift.layers[key]
        for name in ("norm_masked_tau", "cos_masked_tau", "projection", "residual_ratio", "cos_tau", "values"):
            assert getattr(got, name) == pytest.approx(getattr(figures, name), rel=1e-9, abs=1e-12), (key, name)


def test_ties_at_the_threshold(tmp_path):
    """|tau| takes a handful of values: the threshold is a huge tie and every tied value is
    kept; the band, its counts and the corrections must all get the ties right."""
    root = tmp_path / "m"
    paths = write_triple(root, PRESET, shard_size=10**9)
    states = {r: load_folder(p) for r, p in paths.items()}
    g = torch.Generator().manual_seed(5)
    from safetensors.torch import save_file

    harmful = {n: (v.float() + torch.randint(-3, 4, v.shape, generator=g).float() * 2**-7).to(torch.bfloat16)
               for n, v in states["base"].items()}
    for file in paths["harmful"].glob("*.safetensors"):
        file.unlink()
    save_file(harmful, str(paths["harmful"] / "model.safetensors"), metadata={"format": "pt"})
    (paths["harmful"] / "model.safetensors.index.json").unlink(missing_ok=True)
    for scope in ("global", "layer"):
        out = tmp_path / scope
        report = ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], out, scope=scope, top_k=0.3,
                                  chunk_elements=2048, progress=False)
        expected, thresholds = reference_hdr(states["base"], harmful, states["target"], top_k=0.3, scope=scope)
        _check(out, expected)
        assert report.thresholds == thresholds
        assert report.fraction_kept > 0.3  # ties kept


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_rank_inside_a_bin_of_distinct_patterns(tmp_path, scope):
    """float32 inputs: nearly every |tau| has its own bit pattern, so the threshold's bin (2**11
    patterns) holds many distinct values and the exact one is the rank-th of them. (bfloat16
    inputs put the threshold inside a tie, where an off-by-one rank still lands on it.)"""
    paths = write_triple(tmp_path / "m", PRESET, dtype="F32", shard_size=10**9)
    states = {r: load_folder(p) for r, p in paths.items()}
    distinct = torch.unique((states["harmful"]["model.embed_tokens.weight"].float()
                             - states["base"]["model.embed_tokens.weight"].float()).abs()).numel()
    assert distinct > 0.9 * states["base"]["model.embed_tokens.weight"].numel()
    report = ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], tmp_path / "out", scope=scope,
                              top_k=0.1, chunk_elements=4096, progress=False)
    expected, thresholds = reference_hdr(states["base"], states["harmful"], states["target"], top_k=0.1, scope=scope)
    _check(tmp_path / "out", expected)
    assert report.thresholds == thresholds
    assert report.one_read["groups"] >= 1 and not report.one_read["band_missed"]


def test_forced_band_miss_falls_back_exactly(models, tmp_path, monkeypatch):
    """A sample that misleads (here: a band far above the threshold) is seen in the exact
    counts; the group is selected again with two passes and rewritten, and the report says so."""
    from ckptops.hdr import one_read

    original = one_read.estimate_band

    def misleading(*args, **kwargs):
        band = original(*args, **kwargs)
        far = band.lo + 40 * (1 << 23)  # 40 binary orders of magnitude above
        return one_read.Band(far, band.size, far + band.size // 2)

    monkeypatch.setattr(one_read, "estimate_band", misleading)
    paths, states = models
    report = ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], tmp_path / "out", chunk_elements=4096,
                              progress=False)
    expected, _ = reference_hdr(states["base"], states["harmful"], states["target"])
    _check(tmp_path / "out", expected)
    assert report.one_read["band_missed"] == ["all"]
    assert "band missed" in report.format_text()
    _same_drift(report, paths, tmp_path)


def test_corrections_spill_to_a_file(models, tmp_path, monkeypatch):
    from ckptops.hdr import one_read

    monkeypatch.setattr(one_read, "correction_budget", lambda max_memory: 4096)
    paths, states = models
    report = ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], tmp_path / "out", chunk_elements=4096,
                              progress=False)
    expected, _ = reference_hdr(states["base"], states["harmful"], states["target"])
    _check(tmp_path / "out", expected)
    one = report.one_read
    assert one["correction_file_bytes"] > 4096 and one["correction_memory_peak"] <= 4096 + 20 * 4096
    assert not (tmp_path / "out" / "corrections.bin").exists()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_each_input_byte_is_read_once_plus_the_sample(models, tmp_path, monkeypatch, scope):
    """Count the bytes every input file gives (the reader's one read function, wrapped):
    target exactly once; base and harmful once plus at most the 1/64 sample."""
    from ckptops.checkpoint import reader

    counted: Counter = Counter()
    original = reader.pread_into

    def counting(fd, view, offset, where):
        counted[os.path.realpath(where)] += len(view)
        return original(fd, view, offset, where)

    monkeypatch.setattr(reader, "pread_into", counting)
    paths, _ = models
    report = ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], tmp_path / "out", scope=scope,
                              chunk_elements=4096, progress=False)
    assert not report.one_read["band_missed"]
    from safetensors import safe_open

    for role, folder in paths.items():
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                data = sum(f.get_slice(n).get_shape().__len__() and 0 or 0 for n in f.keys())  # noqa: F841
            header = 8 + int.from_bytes(file.read_bytes()[:8], "little")
            data_bytes = file.stat().st_size - header
            got = counted[os.path.realpath(file)]
            if role == "target":
                assert got == data_bytes, (file, got, data_bytes)
            else:
                assert data_bytes <= got <= data_bytes * (1 + 1 / 64) + 4096 * 2 * 4, (role, file, got, data_bytes)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_one_selection_pass_serves_several_top_k(models, monkeypatch, scope):
    """tune's grid asks for several top-k at once: one sample and one band pass (base and
    harmful read once, plus the sample) give every top-k's exact threshold, equal to the
    in-memory reference's kth value of |tau| for each."""
    from ckptops.checkpoint import reader
    from ckptops.checkpoint.resolve import open_checkpoint
    from ckptops.hdr import engine
    from ckptops.hdr.chunks import WorkerPool
    from ckptops.hdr.plan import make_plan

    paths, states = models
    read = Counter()
    original = reader.pread_into

    def counting(fd, view, offset, where):
        read[Path(where).parent.name] += len(view)
        return original(fd, view, offset, where)

    monkeypatch.setattr(reader, "pread_into", counting)
    opened = engine.Models(*(open_checkpoint(paths[k]) for k in ("base", "harmful", "target")))
    plan = make_plan(opened.base, opened.harmful, opened.target, scope=scope)
    pool = WorkerPool(2, 4096)
    top_ks = [0.03, 0.1, 0.25, 1.0]
    try:
        found = engine.select_thresholds_many(plan, opened, pool, top_ks)
    finally:
        pool.close()
        opened.files.close()
    data = sum(2 * task.numel for task in plan.hdr_tasks)  # bfloat16 inputs
    for part in ("base", "harmful"):
        assert data <= read[part] <= data * (1 + 2 / engine.SAMPLE_FRACTION), (part, read[part] / data)
    assert read["target"] == 0
    for top_k in top_ks:
        _, thresholds = reference_hdr(states["base"], states["harmful"], states["target"], top_k=top_k, scope=scope)
        assert {group: s.threshold for group, s in found[top_k].items()} == thresholds, top_k


def test_sample_of_a_lora_tau_places_the_band(models, tmp_path):
    """A LoRA tau_H is zero outside the adapted projections (most of the model's values, with the
    embeddings) and differs in scale between them: the sampled band must still hold the exact
    threshold, so that the pass needs no fallback. (A sample of every 4th chunk in larger pieces
    missed on the 1.1B benchmark; on this small preset it happens to hit, so this guards the
    LoRA sample in general, not that variant.)"""
    import json as _json

    import numpy as np
    from safetensors.numpy import save_file

    paths, states = models
    rng = np.random.default_rng(3)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    tensors = {}
    for name, value in states["base"].items():
        if not name.endswith("proj.weight"):
            continue
        module = name[: -len(".weight")]
        rows, cols = value.shape
        tensors[f"base_model.model.{module}.lora_A.weight"] = (rng.standard_normal((4, cols)) / cols ** 0.5).astype(np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = (rng.standard_normal((rows, 4)) * 1e-3).astype(np.float32)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(_json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "gate_proj", "up_proj", "down_proj"]}))
    report = ckptops.sanitize(paths["base"], adapter, paths["target"], tmp_path / "out", chunk_elements=1024,
                              progress=False)
    assert report.one_read["band_missed"] == []
