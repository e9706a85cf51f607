"""``ckptops diagnose`` (and the same figures inside ``sanitize``) against an in-memory float64
reference written here: synthetic triples theta_t = theta_b + c * tau + noise with known c, a
target whose drift is orthogonal to tau, and theta_t = theta_b."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import llama_state, write_folder
from hdr_reference import load_folder, reference_hdr
from hub_server import hub  # noqa: F401  (fixture)

LAYER = re.compile(r"\.layers\.(\d+)\.")


def reference_figures(paths: dict, *, top_k: float, scale: float, scope: str) -> dict:
    """Every figure per layer group and overall, from the folders, in float64 (no ckptops code).

    tau is float32(harmful) - float32(base) (what HDR subtracts); the selection uses the official
    kthvalue threshold of ``hdr_reference``; the drift d = theta_t - theta_b and all products and
    sums are float64."""
    base, harmful, target = (load_folder(paths[r]) for r in ("base", "harmful", "target"))
    _, thresholds = reference_hdr(base, harmful, target, top_k=top_k, scale=scale, scope=scope)
    parts: dict[str, list] = {}
    for name in target:
        rows = min(base[name].shape[0], harmful[name].shape[0], target[name].shape[0])
        b, h, t = base[name][:rows], harmful[name][:rows], target[name][:rows]
        tau32 = h.float() - b.float()
        m = LAYER.search(name)
        if scope == "global":
            thr = thresholds["all"]
        elif scope == "layer":
            thr = thresholds[f"layer {m.group(1)}" if m else name]
        else:
            thr = thresholds[name]
        mask = torch.ones_like(tau32, dtype=torch.bool) if thr is None else tau32.abs() >= thr
        d = (t.double() - b.double()).flatten()
        tau = tau32.double().flatten()
        mtau = torch.where(mask.flatten(), tau, torch.zeros_like(tau))
        parts.setdefault(f"layer {m.group(1)}" if m else "other", []).append((d, tau, mtau))
    parts["overall"] = [p for key in list(parts) for p in parts[key]]
    figures = {}
    for key, items in parts.items():
        d = torch.cat([p[0] for p in items])
        tau = torch.cat([p[1] for p in items])
        mtau = torch.cat([p[2] for p in items])
        nd, nt, nm = d.norm().item(), tau.norm().item(), mtau.norm().item()
        figures[key] = {
            "values": d.numel(),
            "norm_tau": nt,
            "norm_drift": nd,
            "norm_masked_tau": nm,
            "cos_tau": (d @ tau).item() / (nd * nt) if nd and nt else None,
            "cos_masked_tau": (d @ mtau).item() / (nd * nm) if nd and nm else None,
            "projection": (d @ mtau).item() / nm ** 2 if nm else None,
            "step_ratio": abs(scale) * nm / nd if nd else None,
            "residual_ratio": (d - scale * mtau).norm().item() / nd if nd else None,
        }
    return figures


def assert_figures(got: dict, want: dict, where: str) -> None:
    for name, expected in want.items():
        value = got[name]
        if expected is None:
            assert value is None, f"{where} {name}: {value} (expected undefined)"
            continue
        assert value is not None, f"{where} {name} undefined, expected {expected}"
        # relative error <= 1e-5; cosines of an orthogonal drift sit near 0, where only an absolute
        # bound (far below any threshold the verdict uses) makes sense
        assert abs(value - expected) <= 1e-5 * abs(expected) + 1e-9, f"{where} {name}: {value} != {expected}"


def check_report(drift, reference: dict) -> None:
    assert_figures(drift.overall.__dict__, reference["overall"], "overall")
    assert sorted(drift.layers) == sorted(k for k in reference if k != "overall")
    for key, figures in drift.layers.items():
        assert_figures(figures.__dict__, reference[key], key)


def make_triple(root: Path, kind: str, c: float = 0.8, dtype=torch.bfloat16) -> dict:
    """base, harmful (base + tau) and a target: ``aligned`` (base + c * tau + noise), ``orthogonal``
    (base + a drift orthogonal to tau in every tensor) or ``same`` (the base itself)."""
    base = llama_state(0, dtype=dtype)
    harmful = llama_state(1, dtype=dtype, base=base, delta=0.01)
    g = torch.Generator().manual_seed(7)
    target = {}
    for name, b in base.items():
        tau = harmful[name].double() - b.double()
        noise = torch.randn(b.shape, generator=g, dtype=torch.float64)
        if kind == "aligned":
            drift = c * tau + 0.002 * noise
        elif kind == "orthogonal":
            drift = noise - (noise.flatten() @ tau.flatten()) / (tau.flatten() @ tau.flatten()) * tau
            drift = 0.01 * drift
        else:
            drift = torch.zeros_like(tau)
        target[name] = (b.double() + drift).to(dtype)
    return {
        "base": write_folder(root / "base", base),
        "harmful": write_folder(root / "harmful", harmful, shards=2),
        "target": write_folder(root / "target", target, shards=3),
    }


def run_diagnose(paths, **kw):
    from ckptops.hdr.diagnose import diagnose

    kw.setdefault("chunk_elements", 1024)
    kw.setdefault("progress", False)
    return diagnose(paths["base"], paths["harmful"], paths["target"], **kw)


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("kind", ["aligned", "orthogonal"])
def test_figures_equal_reference(tmp_path, engine_path, scope, kind):
    paths = make_triple(tmp_path, kind, dtype=torch.bfloat16 if kind == "aligned" else torch.float32)
    report = run_diagnose(paths, top_k=0.1, scale=3.0, scope=scope)
    check_report(report.drift, reference_figures(paths, top_k=0.1, scale=3.0, scope=scope))
    _, thresholds = reference_hdr(*(load_folder(paths[r]) for r in ("base", "harmful", "target")), top_k=0.1,
                                  scope=scope)
    assert report.thresholds == thresholds


def test_dense_top_k_one_pass(tmp_path, engine_path):
    """top_k = 1: M tau = tau, one pass; figures still equal the reference."""
    paths = make_triple(tmp_path, "aligned", c=0.5)
    report = run_diagnose(paths, top_k=1.0, scale=2.0)
    reference = reference_figures(paths, top_k=1.0, scale=2.0, scope="global")
    check_report(report.drift, reference)
    assert report.passes == {"one pass": "1"}
    assert math.isclose(report.drift.overall.cos_tau, report.drift.overall.cos_masked_tau, rel_tol=1e-12)


def test_band_path_is_one_pass(tmp_path, monkeypatch, engine_path):
    """When the sampled band holds the threshold, one pass over the three models gives every
    figure exactly (the M-dependent sums per band bin, added above the threshold afterwards)."""
    from ckptops.hdr import diagnose as diag
    from ckptops.hdr import select

    paths = make_triple(tmp_path, "aligned")
    _, thresholds = reference_hdr(*(load_folder(paths[r]) for r in ("base", "harmful", "target")), top_k=0.1)
    bits = select.float_to_bits(thresholds["all"])
    # a band of 4 top bins centred on the true threshold (what a good sample predicts)
    lo = ((bits >> select.TOP_BITS_SHIFT) - 1) << select.TOP_BITS_SHIFT
    monkeypatch.setattr(diag, "estimate_band", lambda *a, **k: (lo, 4 << select.TOP_BITS_SHIFT))
    reads = []
    original = diag._band_kernel

    def counting(*args):
        kernel = original(*args)

        def wrapped(chunk, buf, tally):
            reads.append((chunk.task.name, chunk.start))
            kernel(chunk, buf, tally)
        return wrapped
    monkeypatch.setattr(diag, "_band_kernel", counting)
    monkeypatch.setattr(diag, "_sums_pass", lambda *a, **k: pytest.fail("a second pass ran"))
    report = run_diagnose(paths, top_k=0.1, scale=3.0)
    assert report.passes == {"one pass": "1"}
    assert len(reads) == len(set(reads))  # each chunk read once
    assert report.thresholds == thresholds
    check_report(report.drift, reference_figures(paths, top_k=0.1, scale=3.0, scope="global"))


def test_verdicts(tmp_path):
    aligned = run_diagnose(make_triple(tmp_path / "a", "aligned"))
    assert aligned.drift.verdict.kind == "aligned" and not aligned.drift.verdict.warning
    assert "moved along the harm direction" in aligned.drift.verdict.message
    orthogonal = run_diagnose(make_triple(tmp_path / "o", "orthogonal", dtype=torch.float32))
    assert orthogonal.drift.verdict.kind == "weak" and orthogonal.drift.verdict.warning
    assert "expect damage" in orthogonal.drift.verdict.message and "ckptops tune" in orthogonal.drift.verdict.message
    same = run_diagnose(make_triple(tmp_path / "s", "same"))
    assert same.drift.verdict.kind == "unchanged"
    assert "cannot predict" in same.drift.verdict.message and "evaluate" in same.drift.verdict.message
    assert same.drift.overall.norm_drift == 0.0 and same.drift.overall.cos_tau is None
    assert same.drift.overall.norm_tau > 0


def _snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_cli_writes_nothing_and_prints(tmp_path):
    from ckptops.cli import main

    paths = make_triple(tmp_path / "m", "orthogonal", dtype=torch.float32)
    before = _snapshot(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        args = ["diagnose", "--base", str(paths["base"]), "--harmful", str(paths["harmful"]),
                "--target", str(paths["target"]), "--scale", "3", "--top-k", "0.1"]
        text = CliRunner().invoke(main, args)
        as_json = CliRunner().invoke(main, args + ["--json", "--scope", "layer"])
    finally:
        os.chdir(cwd)
    assert text.exit_code == 0, text.output
    assert "warning:" in text.output and "layer 2" in text.output
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    reference = reference_figures(paths, top_k=0.1, scale=3.0, scope="layer")
    assert_figures(data["drift"]["overall"], reference["overall"], "json overall")
    assert data["drift"]["verdict"]["warning"] is True
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("args, message", [
    (["--top-k", "1.5"], "--top-k"),
    (["--scale", "nan"], "--scale"),
    (["--exclude", ".*"], "no tensor takes part"),
    (["--layers", ""], "--layers"),
])
def test_cli_bad_input(tmp_path, args, message):
    from ckptops.cli import main

    paths = make_triple(tmp_path, "aligned")
    result = CliRunner().invoke(main, ["diagnose", "--base", str(paths["base"]), "--harmful", str(paths["harmful"]),
                                       "--target", str(paths["target"]), *args])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("error: ") and message in result.output


# ---------------------------------------------------------------- the same figures inside sanitize

def _run_sanitize(paths, out, **kw):
    import ckptops

    kw.setdefault("chunk_elements", 1024)
    kw.setdefault("progress", False)
    return ckptops.sanitize(paths["base"], paths["harmful"], paths["target"], out, **kw)


@pytest.mark.parametrize("scope, low_disk", [("global", False), ("layer", False), ("global", True)])
def test_sanitize_records_the_figures(tmp_path, engine_path, scope, low_disk):
    """sanitize adds the sums up in its apply pass (no extra pass): its report, ckptops.json and
    model card hold the reference figures, equal to diagnose's."""
    paths = make_triple(tmp_path / "m", "orthogonal", dtype=torch.float32)
    report = _run_sanitize(paths, tmp_path / "out", top_k=0.1, scale=3.0, scope=scope, low_disk=low_disk)
    reference = reference_figures(paths, top_k=0.1, scale=3.0, scope=scope)
    check_report(report.drift, reference)
    diagnosed = run_diagnose(paths, top_k=0.1, scale=3.0, scope=scope)
    for name, value in diagnosed.drift.overall.__dict__.items():
        other = report.drift.overall.__dict__[name]
        assert other == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert report.drift.verdict == diagnosed.drift.verdict and report.drift.verdict.warning
    recorded = json.loads((tmp_path / "out" / "ckptops.json").read_text())["report"]["drift"]
    assert_figures(recorded["overall"], reference["overall"], "ckptops.json")
    assert_figures(recorded["layers"]["layer 1"], reference["layer 1"], "ckptops.json layer 1")
    # per-chunk sums added in (tensor, offset) order: a rerun records the very same figures
    again = _run_sanitize(paths, tmp_path / "again", top_k=0.1, scale=3.0, scope=scope, low_disk=low_disk)
    assert again.drift == report.drift
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| cos(d, tau) | {reference['overall']['cos_tau']:.3f} |" in card
    assert "**Warning:** the target barely moved" in card
    assert "warning: the target barely moved" in report.format_text()


def test_sanitize_aligned_prints_no_warning(tmp_path, engine_path):
    paths = make_triple(tmp_path / "m", "aligned")
    report = _run_sanitize(paths, tmp_path / "out", top_k=0.1, scale=1.0)
    check_report(report.drift, reference_figures(paths, top_k=0.1, scale=1.0, scope="global"))
    assert not report.drift.verdict.warning and "warning" not in report.format_text()
    assert "moved along the harm direction" in report.format_text()


def test_sums_leave_the_output_bits_unchanged(tmp_path, engine_path):
    """The drift sums ride the update loop; the written weights are those of the reference."""
    from hdr_reference import bits_equal

    paths = make_triple(tmp_path / "m", "aligned")
    _run_sanitize(paths, tmp_path / "out", top_k=0.1, scale=3.0)
    expected, _ = reference_hdr(*(load_folder(paths[r]) for r in ("base", "harmful", "target")), top_k=0.1, scale=3.0)
    got = load_folder(tmp_path / "out")
    assert all(bits_equal(got[n], expected[n]) for n in expected)


def test_lora_harmful(tmp_path, engine_path):
    """theta_H as a LoRA adapter: diagnose measures d against the real base (tau is the adapter's
    delta); sanitize, which never reads the base then, says it did not compute the figures."""
    import ckptops
    from icv_fixtures import make_model, make_tokenizer, save_checkpoint
    from test_lora import _adapter, _reference_delta

    tokenizer = make_tokenizer()
    base = save_checkpoint(make_model("llama", seed=0), tokenizer, tmp_path / "base")
    target = save_checkpoint(make_model("llama", seed=7), tokenizer, tmp_path / "target")
    adapter = _adapter(make_model("llama", seed=0), tmp_path / "adapter")
    report = ckptops.diagnose(base, adapter, target, top_k=1.0, scale=2.0, chunk_elements=1000, progress=False)
    b, t = load_folder(base), load_folder(target)
    delta = _reference_delta(adapter)
    d = torch.cat([(t[n].double() - b[n].double()).flatten() for n in b])
    tau = torch.cat([delta.get(n, torch.zeros(b[n].shape, dtype=torch.float64)).flatten() for n in b])
    cos = (d @ tau).item() / (d.norm() * tau.norm()).item()
    assert report.drift.overall.cos_tau == pytest.approx(cos, rel=1e-5)
    assert report.drift.overall.norm_tau == pytest.approx(tau.norm().item(), rel=1e-5)
    assert report.drift.overall.norm_drift == pytest.approx(d.norm().item(), rel=1e-5)
    sanitized = ckptops.sanitize(base, adapter, target, tmp_path / "out", top_k=0.1, chunk_elements=1000,
                                 progress=False)
    assert sanitized.drift is None and "not computed" in sanitized.format_text()


def test_hub_refs(tmp_path, hub):  # noqa: F811  (the FakeHub fixture)
    """Hub references give the same figures as the local folders."""
    paths = make_triple(tmp_path / "m", "aligned")
    refs = {role: hub.add_folder(f"org/{role}", paths[role]) for role in ("base", "harmful", "target")}
    assert refs
    local = run_diagnose(paths, top_k=0.1, scale=3.0)
    remote = run_diagnose({r: f"org/{r}" for r in ("base", "harmful", "target")}, top_k=0.1, scale=3.0)
    # the band path's bins add up per worker thread: equal up to float64 summation order
    for name, value in local.drift.overall.__dict__.items():
        assert remote.drift.overall.__dict__[name] == pytest.approx(value, rel=1e-12), name
    assert remote.inputs["target"] == "org/target"


def test_tensor_scope(tmp_path):
    paths = make_triple(tmp_path, "aligned", c=0.3)
    report = run_diagnose(paths, top_k=0.2, scale=2.0, scope="tensor")
    check_report(report.drift, reference_figures(paths, top_k=0.2, scale=2.0, scope="tensor"))


def test_layers_and_exclude_count_only_hdr_values(tmp_path):
    """--layers 1: only layer 1 counts (its global top-k is layer 1's own); --exclude drops tensors."""
    paths = make_triple(tmp_path, "aligned", c=0.4)
    report = run_diagnose(paths, top_k=0.1, scale=3.0, layers="1")
    reference = reference_figures(paths, top_k=0.1, scale=3.0, scope="layer")
    assert list(report.drift.layers) == ["layer 1"]
    assert_figures(report.drift.overall.__dict__, reference["layer 1"], "--layers 1")
    excluded = run_diagnose(paths, top_k=1.0, scale=3.0, exclude=[r"embed_tokens|lm_head|norm\.weight$"])
    assert excluded.drift.overall.values == sum(r["values"] for k, r in reference.items() if k.startswith("layer ")) - 3 * 2 * 32
