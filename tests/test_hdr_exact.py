"""The streamed output equals an independent in-memory reference bit for bit."""

from __future__ import annotations

import os

import pytest
import torch

import ckptops
from conftest import llama_state, write_folder
from hdr_reference import bits_equal, load_folder, read_index, reference_hdr


#: every test here runs on both engine paths (fused C loops and torch ops)
pytestmark = pytest.mark.usefixtures("engine_path")

def _check(out, expected):
    got = load_folder(out)
    assert set(got) == set(expected)
    bad = [n for n in expected if not bits_equal(got[n], expected[n])]
    assert not bad, f"differs from the reference: {bad[:5]}"


@pytest.mark.parametrize("scope", ["global", "layer", "tensor"])
@pytest.mark.parametrize("chunk", [None, 1000])
def test_scopes_match_reference(triple, tmp_path, scope, chunk):
    paths, states = triple
    report = ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], tmp_path / "out",
                              scope=scope, chunk_elements=chunk, progress=False)
    expected, thresholds = reference_hdr(states["base"], states["harmful"], states["target"], scope=scope)
    _check(tmp_path / "out", expected)
    assert report.thresholds == pytest.approx(thresholds)


def test_ties_are_kept(tmp_path):
    """Coarse values make huge ties at the threshold: every tied entry is kept."""
    base = llama_state(0)
    harmful = {n: (v.float() + torch.randint(-2, 3, v.shape).float() * 2**-8).to(torch.bfloat16) for n, v in base.items()}
    target = llama_state(5, base=base, delta=0.003)
    p = [write_folder(tmp_path / r, s) for r, s in (("b", base), ("h", harmful), ("t", target))]
    report = ckptops.sanitize(*p, tmp_path / "out", top_k=0.3, chunk_elements=777, progress=False)
    expected, thresholds = reference_hdr(base, harmful, target, top_k=0.3)
    _check(tmp_path / "out", expected)
    # far more than 30% kept because of ties at the threshold; the count is exact
    magnitudes = torch.cat([(harmful[n].float() - base[n].float()).abs().flatten() for n in base])
    assert report.values_selected == int((magnitudes >= thresholds["all"]).sum())
    assert report.fraction_kept > 0.3
    assert report.thresholds["all"] == thresholds["all"]


def test_radix_select_matches_kthvalue_on_hard_distributions():
    from ckptops.hdr import select

    g = torch.Generator().manual_seed(3)
    cases = [
        torch.zeros(5000),
        torch.randn(10000, generator=g) * 1e-30,  # subnormal-ish magnitudes
        torch.cat([torch.zeros(900), torch.ones(100) * 3.5]),
        torch.randn(20000, generator=g).exp() * 1e10,
        torch.tensor([1.0]),
    ]
    for values in cases:
        mag = values.abs()
        for k in (0.001, 0.1, 0.5, 0.9999):
            d = mag.numel()
            rank = select.kth_rank(d, k)
            bits = mag.view(torch.int32)
            top, r = select.locate(torch.bincount(bits >> 15, minlength=select.TOP_BINS), rank)
            low_vals = bits[(bits >> 15) == top] & (select.LOW_BINS - 1)
            low, _ = select.locate(torch.bincount(low_vals, minlength=select.LOW_BINS), r)
            got = select.bits_to_float((top << 15) | low)
            assert got == mag.kthvalue(max(1, d - int(d * k))).values.item()


@pytest.mark.parametrize("path", ["band", "two-pass"])
def test_tensors_changed_matches_reference(tmp_path, monkeypatch, path):
    """``tensors_changed`` counts the tensors holding a selected non-zero tau. tau takes a few
    exact values here, so the threshold is a massive tie: tensors whose largest |tau| equals the
    threshold exactly are changed, those whose largest |tau| is one step below are not, and
    those with tau == 0 are not."""
    from ckptops.hdr import engine

    g = torch.Generator().manual_seed(11)
    shapes = {n: v.shape for n, v in llama_state(0).items()}
    base = {n: torch.zeros(shape, dtype=torch.bfloat16) for n, shape in shapes.items()}
    harmful = {}
    for i, (n, shape) in enumerate(shapes.items()):
        steps = (3, 2, 1)[i % 3]  # |tau| up to 2, up to 1, or 0 (in units of 2**-8)
        harmful[n] = (torch.randint(-steps + 1, steps, shape, generator=g).float() * 2**-8).to(torch.bfloat16)
    target = llama_state(2, delta=0.004, base=llama_state(0))
    p = [write_folder(tmp_path / r, st) for r, st in (("b", base), ("h", harmful), ("t", target))]
    passes = []
    monkeypatch.setattr(engine, "_count_low_kernel", lambda *a, o=engine._count_low_kernel: passes.append(1) or o(*a))
    if path == "two-pass":
        monkeypatch.setattr(engine, "MIN_CHUNKS_FOR_BAND", 10**9)
    report = ckptops.sanitize(*p, tmp_path / "out", chunk_elements=64, progress=False)
    assert bool(passes) == (path == "two-pass")
    _, thresholds = reference_hdr(base, harmful, target)
    t = thresholds["all"]
    assert t == 2 * 2**-8  # the tie case this test is about
    taus = {n: harmful[n].float() - base[n].float() for n in shapes}
    expected = sum(1 for n in shapes if bool(((taus[n].abs() >= t) & (taus[n] != 0)).any()))
    assert 0 < expected < len(shapes)
    assert report.tensors_changed == expected


def test_one_ulp_below_the_threshold_is_not_selected(tmp_path):
    """float32 inputs: 100 values of |tau| tie at exactly 1.0, five lie one ulp below it, and
    k keeps 50, so t = 1.0: the ties are kept, the values one ulp below are not."""
    shapes = {n: v.shape for n, v in llama_state(0).items()}
    base = {n: torch.zeros(shape) for n, shape in shapes.items()}
    harmful = {n: torch.full(shape, 2.0**-20) for n, shape in shapes.items()}
    name = next(n for n, shape in shapes.items() if torch.Size(shape).numel() >= 200)
    flat = harmful[name].view(-1)
    flat[:100] = 1.0
    flat[100:105] = -torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))
    target = {n: torch.full(shape, 0.5) for n, shape in shapes.items()}
    p = [write_folder(tmp_path / r, st) for r, st in (("b", base), ("h", harmful), ("t", target))]
    d = sum(torch.Size(shape).numel() for shape in shapes.values())
    top_k = 50.5 / d
    report = ckptops.sanitize(*p, tmp_path / "out", top_k=top_k, chunk_elements=64, progress=False)
    expected, thresholds = reference_hdr(base, harmful, target, top_k=top_k)
    assert thresholds["all"] == 1.0 and report.values_selected == 100
    _check(tmp_path / "out", expected)


def test_report_names_the_engine_path(triple, tmp_path, engine_path):
    paths, _ = triple
    report = ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], tmp_path / "out", progress=False)
    assert report.engine == ("fused C loops" if engine_path == "fused" else "torch ops")
    assert report.engine in report.format_text()


def test_band_counts_match_a_plain_count():
    """The numpy band counter against a Python count of each bit pattern, with values on both
    band edges, every pattern repeated, a band reaching the top of the int32 range, and both the
    sparse (add.at) and the dense (bincount) in-band paths."""
    import numpy as np

    from ckptops.hdr import select

    rng = np.random.default_rng(7)
    top = 2**31
    for lo, size, n in ((1000, 64, 5000), (1000, 4096, 5000), (top - 256, 256, 3000), (0, 8, 100)):
        values = rng.integers(max(0, lo - 300), min(top, lo + size + 300), n).astype(np.int32)
        values[:4] = [lo, lo + size - 1, max(0, lo - 1), min(top - 1, lo + size)]
        hist = np.zeros(size + 2, dtype=np.int64)
        masks = np.empty(n + 10, dtype=np.bool_), np.empty(n + 10, dtype=np.bool_)
        for part in (values[: n // 3], values[n // 3:]):  # accumulates across calls
            select.add_band_counts(part.copy(), lo, size, hist, *masks)
        expected = [0] * (size + 2)
        for v in values.tolist():
            expected[0 if v < lo else size + 1 if v >= lo + size else v - lo + 1] += 1
        assert hist.tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_input_dtypes_and_output_dtype(tmp_path, dtype):
    base = llama_state(0, dtype=dtype)
    harmful = llama_state(1, dtype=torch.bfloat16, base=base, delta=0.01)  # mixed input dtypes
    target = llama_state(2, dtype=dtype, base=base, delta=0.004)
    p = [write_folder(tmp_path / r, s) for r, s in (("b", base), ("h", harmful), ("t", target))]
    ckptops.sanitize(*p, tmp_path / "out", chunk_elements=500, progress=False)
    expected, _ = reference_hdr(base, harmful, target)
    _check(tmp_path / "out", expected)
    ckptops.sanitize(*p, tmp_path / "out32", dtype="float32", progress=False)
    expected, _ = reference_hdr(base, harmful, target, out_dtype=torch.float32)
    _check(tmp_path / "out32", expected)


@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out", ["bfloat16", "float16", "float32"])
def test_dtype_conversion_of_changed_and_unchanged_tensors(tmp_path, source, out):
    """--dtype on every input/output pair, with excluded (copied, converted) tensors beside
    changed ones, and a signed zero in the target."""
    base = llama_state(0, dtype=source)
    harmful = llama_state(1, dtype=source, base=base, delta=0.01)
    target = llama_state(2, dtype=source, base=base, delta=0.004)
    target["model.norm.weight"][:3] = torch.tensor([-0.0, 0.0, 1e-30]).to(source)
    p = [write_folder(tmp_path / r, st) for r, st in (("b", base), ("h", harmful), ("t", target))]
    exclude = [r"norm\.weight$", "embed_tokens"]
    ckptops.sanitize(*p, tmp_path / "out", dtype=out, exclude=exclude, chunk_elements=700, progress=False)
    expected, _ = reference_hdr(base, harmful, target, exclude=exclude, out_dtype=getattr(torch, out))
    _check(tmp_path / "out", expected)


def test_exclude_layers_and_dense(triple, tmp_path):
    paths, s = triple
    args = (paths["base"], paths["harmful"], paths["target"])
    ckptops.sanitize(*args, tmp_path / "ex", exclude=["embed_tokens", r"norm\.weight$"], chunk_elements=999, progress=False)
    expected, _ = reference_hdr(s["base"], s["harmful"], s["target"], exclude=["embed_tokens", r"norm\.weight$"])
    _check(tmp_path / "ex", expected)
    assert bits_equal(load_folder(tmp_path / "ex")["model.embed_tokens.weight"], s["target"]["model.embed_tokens.weight"])

    ckptops.sanitize(*args, tmp_path / "ly", layers="1-2", chunk_elements=999, progress=False)
    expected, _ = reference_hdr(s["base"], s["harmful"], s["target"], layers={1, 2})
    _check(tmp_path / "ly", expected)
    got = load_folder(tmp_path / "ly")
    for name, value in s["target"].items():  # nothing outside layers 1-2 changes
        if ".layers.1." not in name and ".layers.2." not in name:
            assert bits_equal(got[name], value), name

    ckptops.sanitize(*args, tmp_path / "dense", top_k=1.0, scale=0.1, progress=False)
    expected, _ = reference_hdr(s["base"], s["harmful"], s["target"], top_k=1.0, scale=0.1)
    _check(tmp_path / "dense", expected)


def test_vocab_resized_target_and_target_only_tensor(tmp_path):
    base = llama_state(0)
    harmful = llama_state(1, base=base, delta=0.01)
    target = llama_state(2, vocab=99, base=base, delta=0.004)  # SFT added 3 tokens
    target["model.extra_buffer.weight"] = torch.ones(4, dtype=torch.bfloat16)
    p = [write_folder(tmp_path / r, s) for r, s in (("b", base), ("h", harmful), ("t", target))]
    report = ckptops.sanitize(*p, tmp_path / "out", chunk_elements=1000, progress=False)
    expected, _ = reference_hdr(base, harmful, target)
    _check(tmp_path / "out", expected)
    got = load_folder(tmp_path / "out")
    assert bits_equal(got["model.embed_tokens.weight"][96:], target["model.embed_tokens.weight"][96:])
    assert set(report.resized) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert report.copied["only in target"] == ["model.extra_buffer.weight"]


def test_single_file_inputs_and_resharding(triple, tmp_path):
    paths, s = triple
    ckptops.sanitize(paths["base"] / "model.safetensors", paths["harmful"], paths["target"], tmp_path / "out",
                     shard_size="40KB", progress=False)
    expected, _ = reference_hdr(s["base"], s["harmful"], s["target"])
    _check(tmp_path / "out", expected)
    index = read_index(tmp_path / "out")
    files = set(index["weight_map"].values())
    assert len(files) >= 2 and all((tmp_path / "out" / f).exists() for f in files)
    for f in files:  # no shard over 40 kB unless it holds a single larger tensor
        names = [n for n, v in index["weight_map"].items() if v == f]
        size = sum(expected[n].numel() * expected[n].element_size() for n in names)
        assert size <= 40_000 or len(names) == 1


def test_target_sharding_is_kept(triple, tmp_path):
    paths, _ = triple
    ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], tmp_path / "out", progress=False)
    assert read_index(tmp_path / "out")["weight_map"] == read_index(paths["target"])["weight_map"]


@pytest.mark.parametrize("mode", ["band disabled", "band missed"])
def test_two_pass_fallback_is_exact(triple, tmp_path, monkeypatch, mode):
    """The one-pass band count relies on a sampled guess; when there is no band, or the guess
    misses, the two-pass radix select must still give the exact threshold."""
    from ckptops.hdr import engine, select

    paths, s = triple
    calls = {"low": 0}
    original_low = engine._count_low_kernel

    def counting_low(*args):
        calls["low"] += 1
        return original_low(*args)

    monkeypatch.setattr(engine, "_count_low_kernel", counting_low)
    if mode == "band disabled":
        monkeypatch.setattr(engine, "MIN_CHUNKS_FOR_BAND", 10**9)
    else:
        # the sample places the threshold among the smallest |tau|: the band holds no rank
        monkeypatch.setattr(engine, "band_around", lambda hist, count, rank: (0, 4 << select.TOP_BITS_SHIFT))
    # the two-pass engine's own fallback (one_read=False); the one-read pass's is in test_one_read
    ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], tmp_path / "out", chunk_elements=1000,
                     progress=False, one_read=False)
    expected, _ = reference_hdr(s["base"], s["harmful"], s["target"])
    _check(tmp_path / "out", expected)
    assert calls["low"] == 1


def test_fused_path_runs_without_torch(triple, tmp_path):
    """The fused path needs no torch (its import alone takes over a second); the torch path
    imports it."""
    import subprocess
    import sys

    from ckptops.hdr import fused

    if fused._fused is None:
        pytest.skip("the fused extension is not built")
    paths, _ = triple
    code = (
        "import sys, ckptops\n"
        f"ckptops.sanitize({str(paths['base'])!r}, {str(paths['harmful'])!r}, {str(paths['target'])!r}, "
        f"sys.argv[1], progress=False)\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    for env, expected in (({}, "NO-TORCH"), ({"CKPTOPS_NO_FUSED": "1"}, "TORCH")):
        out = tmp_path / expected
        result = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                                env={**os.environ, "CKPTOPS_NO_FUSED": "", **env})
        assert result.stdout.strip().endswith(expected), result.stdout[-500:] + result.stderr[-1000:]



@pytest.mark.parametrize("case", ["top-k 1", "tau on few values"])
def test_tensors_changed_when_the_threshold_is_zero(tmp_path, case):
    """A threshold of 0 (top-k 1, or tau non-zero on less than k of the values, as a LoRA
    theta_H covering a few tensors gives) still changes every tensor holding a non-zero tau:
    the report counts those, and the "harm vector is zero" warning stays quiet."""
    import warnings

    base = llama_state(0)
    names = sorted(base)
    if case == "top-k 1":
        harmful, top_k = llama_state(1, base=base, delta=0.01), 1.0
    else:  # two tensors moved, far under 10% of the values
        moved = [n for n in names if n.endswith("q_proj.weight")][:2]
        harmful = {n: (v.float() + 0.01).to(v.dtype) if n in moved else v.clone() for n, v in base.items()}
        top_k = 0.1
    target = llama_state(2, base=base, delta=0.004)
    p = [write_folder(tmp_path / r, s) for r, s in (("b", base), ("h", harmful), ("t", target))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = ckptops.sanitize(*p, tmp_path / "out", top_k=top_k, progress=False)
    expected_out, thresholds = reference_hdr(base, harmful, target, top_k=top_k)
    _check(tmp_path / "out", expected_out)
    assert thresholds["all"] in (0.0, None)  # the case this test is about
    changed = sum(1 for n in names if bool((harmful[n].float() - base[n].float() != 0).any()))
    assert 0 < changed
    assert report.tensors_changed == changed
    assert not [w for w in caught if "harm vector is zero" in str(w.message)]
