"""LoRA adapters as theta_H and as "BASE+ADAPTER" targets, against an independent float64 reference.

The reference merges the adapter densely in float64 from the safetensors file (its own key
parsing and scaling rule, written from PEFT's documented formula) and applies Harm Direction
Removal in memory: tau = theta_H - theta_b, global top-k by ``kthvalue``, theta_t - scale * mask * tau.
ckptops forms scaling * B @ A in float32 row blocks, so values whose |tau| lies within float32
rounding of the threshold may be selected differently: those are counted, bounded and checked to
be the only differences.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import ckptops
from ckptops.cli import main
from hdr_reference import load_folder
from icv_fixtures import make_model, make_tokenizer, save_checkpoint

pytestmark = pytest.mark.usefixtures("engine_path")

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter(model, folder, *, r=4, alpha=8, seed=0, targets=PROJ, **extra):
    """A PEFT LoRA adapter with random (non-zero) A and B, saved with peft itself."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **extra)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # make the delta comparable with the weights
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.5)
    peft_model.save_pretrained(folder)
    peft_model.unload()
    return folder


def _reference_delta(folder) -> dict[str, torch.Tensor]:
    """float64 scaling * B @ A per base tensor, parsed by hand from the adapter files."""
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = load_file(str(folder / "adapter_model.safetensors"))
    deltas = {}
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        b = weights[key.replace("lora_A", "lora_B")]
        short = module.split(".")[-1]
        r = (config.get("rank_pattern") or {}).get(short, config["r"])
        alpha = (config.get("alpha_pattern") or {}).get(short, config["lora_alpha"])
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        delta = b.double() @ a.double() * scaling
        if config.get("fan_in_fan_out"):
            delta = delta.T
        deltas[module + ".weight"] = delta
    return deltas


def _reference_hdr(base, tau, target, top_k, scale):
    """(expected float64 outputs, threshold, |tau| of every scalar)."""
    flat = torch.cat([tau.get(n, torch.zeros(base[n].shape, dtype=torch.float64)).abs().flatten() for n in base])
    d = flat.numel()
    threshold = flat.kthvalue(max(1, d - int(d * top_k))).values.item()
    out = {}
    for name, t in target.items():
        v = tau.get(name)
        out[name] = t.double() if v is None else t.double() - scale * torch.where(v.abs() >= threshold, v, 0.0)
    return out, threshold


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tokenizer = make_tokenizer()
    base = save_checkpoint(make_model("llama", seed=0), tokenizer, root / "base")
    target = save_checkpoint(make_model("llama", seed=7), tokenizer, root / "target")
    adapter = _adapter(make_model("llama", seed=0), root / "adapter")
    patterned = _adapter(make_model("llama", seed=0), root / "patterned", seed=1, r=4, alpha=8,
                         rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3}, use_rslora=True)
    return {"root": root, "base": base, "target": target, "adapter": adapter, "patterned": patterned}


@pytest.mark.parametrize("which", ["adapter", "patterned", "adapter, numpy products"])
def test_adapter_as_harmful_matches_float64_reference(tiny, tmp_path, which, monkeypatch):
    """``numpy products``: the products without the C extension's loop (numpy's matmul)."""
    if which.endswith("numpy products"):
        from ckptops.hdr import fused

        monkeypatch.setattr(fused, "built", lambda: False)
        which = "adapter"
    out = tmp_path / "out"
    report = ckptops.sanitize(tiny["base"], tiny[which], tiny["target"], out, top_k=0.05, scale=3.0,
                              chunk_elements=1000, progress=False)
    base, target = load_folder(tiny["base"]), load_folder(tiny["target"])
    tau = _reference_delta(tiny[which])
    expected, threshold = _reference_hdr(base, tau, target, 0.05, 3.0)
    got = load_folder(out)
    assert set(got) == set(expected)
    # every scalar counts in the selection, zeros of the untouched tensors included
    assert report.values_selected_over == sum(t.numel() for t in base.values())
    assert report.thresholds["all"] == pytest.approx(threshold, rel=1e-5)
    near_total, differ_total = 0, 0
    for name, want in expected.items():
        have = got[name].double()
        if name not in tau:
            assert torch.equal(got[name], target[name]), name
            continue
        near = (tau[name].abs() - threshold).abs() <= 1e-5 * threshold
        close = torch.isclose(have, want, rtol=1e-6, atol=1e-7)
        differ = ~close
        assert not (differ & ~near).any(), f"{name}: differs away from the threshold"
        # where the selection differs, it is by exactly one tau (selected on one side only)
        if differ.any():
            gap = (have - want)[differ].abs()
            assert torch.allclose(gap, 3.0 * tau[name][differ].abs(), rtol=1e-5)
        near_total += int(near.sum())
        differ_total += int(differ.sum())
    assert differ_total <= near_total <= 20, (differ_total, near_total)
    assert report.tensors_changed > 0


def test_base_plus_adapter_target_equals_reference_merge(tiny, tmp_path):
    """Target = base + adapter merged on the fly: float32(base) + delta, HDR, rounded once."""
    from conftest import llama_state, write_folder  # noqa: F401  (keeps fixture imports uniform)

    out = tmp_path / "out"
    ref = f"{tiny['base']}+{tiny['adapter']}"
    ckptops.sanitize(tiny["base"], tiny["target"], ref, out, top_k=0.05, scale=0.5, chunk_elements=999,
                     progress=False)
    base, harmful = load_folder(tiny["base"]), load_folder(tiny["target"])
    delta = _reference_delta(tiny["adapter"])
    merged = {n: v.double() + delta[n] if n in delta else v.double() for n, v in base.items()}
    tau = {n: harmful[n].double() - base[n].double() for n in base}
    expected, threshold = _reference_hdr(base, tau, merged, 0.05, 0.5)
    got = load_folder(out)
    for name, want in expected.items():
        assert got[name].dtype == base[name].dtype
        near = (tau[name].abs() - threshold).abs() <= 1e-6 * threshold
        close = torch.isclose(got[name].double(), want, rtol=1e-6, atol=1e-7)
        assert not (~close & ~near).any(), name
    # the config and tokenizer come from the base
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_base_plus_adapter_copy_is_merge_rounded_once(tiny, tmp_path):
    """A tensor excluded from HDR is copied: float32(base) + delta rounded once to its dtype."""
    out = tmp_path / "out"
    ref = f"{tiny['base']}+{tiny['adapter']}"
    ckptops.sanitize(tiny["base"], tiny["target"], ref, out, exclude=[r"layers\.1\."], dtype="bfloat16",
                     progress=False)
    base, got = load_folder(tiny["base"]), load_folder(out)
    delta = _reference_delta(tiny["adapter"])
    name = "model.layers.1.mlp.down_proj.weight"
    want = (base[name].double() + delta[name]).float().to(torch.bfloat16)
    mismatched = (got[name].float() != want.float()).sum().item()
    assert mismatched <= 2  # float32 vs float64 product may straddle a bfloat16 rounding boundary


def test_existing_path_with_plus_wins(tiny, tmp_path):
    """A real folder whose name holds '+' is one model, not BASE+ADAPTER."""
    import shutil

    odd = tmp_path / "model+v2"
    shutil.copytree(tiny["target"], odd)
    report = ckptops.sanitize(tiny["base"], tiny["adapter"], odd, tmp_path / "out", progress=False)
    assert report.inputs["target"]["type"] == "local"


def test_gpt2_conv1d_adapter_fan_in_fan_out(tmp_path):
    tokenizer = make_tokenizer()
    base = save_checkpoint(make_model("gpt2", seed=0), tokenizer, tmp_path / "base")
    adapter = _adapter(make_model("gpt2", seed=0), tmp_path / "adapter", targets=["c_attn", "c_fc"],
                       fan_in_fan_out=True)
    out = tmp_path / "out"
    ckptops.sanitize(base, adapter, base, out, top_k=1.0, scale=1.0, progress=False)
    want = load_folder(base)
    delta = _reference_delta(adapter)
    got = load_folder(out)
    for name, value in want.items():
        expected = value.double() - delta.get(name, 0.0)
        assert torch.allclose(got[name].double(), expected, rtol=1e-5, atol=1e-6), name


# ------------------------------------------------------------------ bad input, through the CLI

def _cli(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def _copy_adapter(src, dst, config_edit=None, weights_edit=None):
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(str(src / "adapter_model.safetensors"))
    if weights_edit:
        weights = weights_edit(weights)
    if weights is not None:
        save_file(weights, str(dst / "adapter_model.safetensors"))
    return dst


def _drop_rank(weights):
    return {k: (v[:0] if ".lora_A." in k else v[:, :0]) for k, v in weights.items()}


BAD = {
    "dora": (lambda c: c.update(use_dora=True), None, "DoRA"),
    "modules_to_save": (lambda c: c.update(modules_to_save=["lm_head"]), None, "modules_to_save"),
    "rank0": (lambda c: c.update(r=0), None, "rank"),
    "rank0-tensors": (None, _drop_rank, "rank"),
    "unknown-module": (None, lambda w: {k.replace("q_proj", "qq_proj"): v for k, v in w.items()}, "not a tensor of the base"),
    "shape": (None, lambda w: {k: (v[:, :-1].contiguous() if ".lora_A." in k and "q_proj" in k else v) for k, v in w.items()}, "does not fit"),
    "embedding": (None, lambda w: dict(w, **{"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 8)}), "embedding adapter"),
    "magnitude": (None, lambda w: dict(w, **{"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)}), "DoRA"),
    "pickle": (None, lambda w: None, "never unpickles"),
    # pattern fields and booleans (PEFT's rank_pattern / alpha_pattern: regular expression -> number)
    "rank_pattern-bad-regex": (lambda c: c.update(rank_pattern={"(": 4}), None,
                               "rank_pattern key '(' is not a valid regular expression"),
    "alpha_pattern-bad-regex": (lambda c: c.update(alpha_pattern={"[": 4}), None,
                                "alpha_pattern key '[' is not a valid regular expression"),
    "rank_pattern-list": (lambda c: c.update(rank_pattern=[4]), None, "rank_pattern must be an object"),
    "alpha_pattern-string": (lambda c: c.update(alpha_pattern="x"), None, "alpha_pattern must be an object"),
    "rank_pattern-zero": (lambda c: c.update(rank_pattern={"q_proj": 0}), None, "rank_pattern key 'q_proj'"),
    "rank_pattern-true": (lambda c: c.update(rank_pattern={"q_proj": True}), None, "not true"),
    "alpha_pattern-string-value": (lambda c: c.update(alpha_pattern={"q_proj": "8"}), None, "alpha_pattern key 'q_proj'"),
    "r-true": (lambda c: c.update(r=True), None, "r (the LoRA rank) must be a positive integer, not true"),
    "lora_alpha-true": (lambda c: c.update(lora_alpha=True), None, "lora_alpha must be a finite number, not true"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapters_one_line_no_output(tiny, tmp_path, case):
    config_edit, weights_edit, words = BAD[case]
    bad = _copy_adapter(tiny["adapter"], tmp_path / "bad", config_edit, weights_edit)
    if case == "pickle":
        (bad / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    for args in (("--harmful", bad, "--target", tiny["target"]),
                 ("--harmful", tiny["target"], "--target", f"{tiny['base']}+{bad}")):
        out = tmp_path / "out"
        result = _cli("sanitize", "--base", tiny["base"], *args, "--out", out)
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert words in lines[0], lines[0]
        assert not out.exists()
    if config_edit is not None:  # a config problem names the config file, in every command that reads it
        assert str(bad / "adapter_config.json") in lines[0], lines[0]
        result = _cli("diagnose", "--base", tiny["base"], "--harmful", bad, "--target", tiny["target"])
        assert result.exit_code == 1 and result.output.strip().splitlines() == [lines[0]], result.output


def test_base_name_mismatch_is_a_warning(tiny, tmp_path):
    bad = _copy_adapter(tiny["adapter"], tmp_path / "other",
                        lambda c: c.update(base_model_name_or_path="someone/other-model"))
    result = _cli("sanitize", "--base", tiny["base"], "--harmful", bad, "--target", tiny["target"],
                  "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "other-model" in result.output


def test_tune_accepts_an_adapter_as_harmful(tiny, tmp_path):
    """tune's in-memory candidates read theta_H through the same adapter source: a candidate
    equals the sanitize output with the adapter, bit for bit."""
    from ckptops.icv.load import load_model
    from ckptops.tune.apply import InMemoryHDR

    out = tmp_path / "out"
    ckptops.sanitize(tiny["base"], tiny["adapter"], tiny["target"], out, top_k=0.05, scale=3.0, progress=False)
    written = load_folder(out)
    loaded = load_model(tiny["target"], dtype=torch.float32, quiet=True, hash_weights=False)
    hdr = InMemoryHDR(tiny["base"], tiny["adapter"], tiny["target"], loaded.model, chunk=777)
    try:
        hdr.apply(3.0, 0.05)
        state = loaded.model.state_dict()
        assert [n for n, v in written.items() if n in state and not torch.equal(state[n], v)] == []
    finally:
        hdr.close()


@pytest.mark.parametrize("scaling", [1.0, 2.0, 4.0, 0.5, 3.0])
def test_folded_scaling_gives_the_bits_of_scaling_after_the_product(scaling, engine_path):
    """The engine forms (s * B) @ A when s is a power of two >= 1: the same bits as PEFT's
    fl(B @ A) * s, checked here against the plain product."""
    from ckptops.checkpoint.lora import LoraModule, _fold_scaling

    import numpy as np

    rng = np.random.default_rng(1)
    a = rng.standard_normal((16, 300)).astype(np.float32)
    b = (rng.standard_normal((200, 16)) * 1e-2).astype(np.float32)
    module = _fold_scaling(LoraModule("w", a, b.copy(), scaling, False, scaling))
    assert np.array_equal((module.b @ module.a) * np.float32(module.post_scale), (b @ a) * np.float32(scaling))
    assert (module.post_scale == 1.0) == (scaling in (1.0, 2.0, 4.0))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_low_disk_gives_the_same_bytes_with_adapters(tiny, tmp_path, scope):
    runs = {}
    for low_disk in (False, True):
        out = tmp_path / f"out-{low_disk}"
        ckptops.sanitize(tiny["base"], tiny["adapter"], f"{tiny['base']}+{tiny['patterned']}", out, scope=scope,
                         low_disk=low_disk, chunk_elements=999, progress=False)
        runs[low_disk] = (out / "model.safetensors").read_bytes()
    assert runs[False] == runs[True]


def test_card_of_a_base_plus_adapter_target_names_the_base(tiny, tmp_path):
    out = tmp_path / "out"
    ckptops.sanitize(tiny["base"], tiny["target"], f"{tiny['base']}+{tiny['adapter']}", out, progress=False)
    card = (out / "README.md").read_text()
    front = card.split("\n---\n")[0]
    assert "base_model:" not in front and "adapter_sha256" in card  # a local base: no Hub model to link


def test_tune_accepts_base_plus_adapter_as_target(tiny, tmp_path):
    """tune loads BASE and merges the target's adapter in memory: with no HDR the model holds the
    merged target (every adapted tensor, excluded ones too), and a candidate equals what sanitize
    writes for the same BASE+ADAPTER target, bit for bit."""
    from ckptops.tune.run import TuneSession
    from ckptops.tune.space import TARGET, Candidate

    ref = f"{tiny['base']}+{tiny['adapter']}"
    exclude = [r"down_proj"]  # adapted but left out of HDR: must still be the merged value
    out = tmp_path / "out"
    ckptops.sanitize(tiny["base"], tiny["target"], ref, out, top_k=0.05, scale=0.5, exclude=exclude, progress=False)
    written = load_folder(out)
    base = load_folder(tiny["base"])
    delta = _reference_delta(tiny["adapter"])
    session = TuneSession(tiny["base"], tiny["target"], ref, exclude=exclude)
    try:
        session.set(TARGET)
        state = session.model.state_dict()
        for name, d in delta.items():  # the merged target, against an independent float64 merge
            want = base[name].double() + d
            assert not torch.equal(state[name].to(base[name].dtype), base[name]), name
            assert torch.allclose(state[name].double(), want, rtol=1e-2, atol=1e-2), name
        session.set(Candidate(top_k=0.05, scale=0.5, alpha=0.0))
        state = session.model.state_dict()
        assert [n for n, v in written.items() if n in state and not torch.equal(state[n].to(v.dtype), v)] == []
        assert any("down_proj" in n for n in delta)
    finally:
        session.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_adapter_factors_in_any_float_dtype_read_as_torch_float(tmp_path, dtype):
    """The factors are read without torch: bfloat16/float16 widened, float64 rounded, exactly as
    torch's ``.float()`` does (checked against safetensors.torch + ``.float()``)."""
    import json as _json

    import numpy as np
    from safetensors.torch import load_file, save_file

    from ckptops.checkpoint.lora import read_adapter

    g = torch.Generator().manual_seed(5)
    tensors = {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.randn(4, 24, generator=g).to(dtype),
               "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": (torch.randn(40, 4, generator=g) * 1e-3).to(dtype)}
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"][0, 0] = 1e-40  # a subnormal for float16/32
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(_json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 3,
                                                             "target_modules": ["up_proj"]}))
    module = read_adapter(folder).modules["model.layers.0.mlp.up_proj.weight"]
    want = load_file(str(folder / "adapter_model.safetensors"))
    assert np.array_equal(module.a, want["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"].float().numpy())
    assert np.array_equal(module.b, want["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].float().numpy())


def test_a_mistyped_adapter_after_plus_is_no_such_folder_without_the_hub(tiny, tmp_path, monkeypatch):
    """BASE+ADAPTER where ADAPTER is a missing local folder: named as missing at once (with the
    nearest name), never looked up on the Hub as a repo id."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("asked the Hub"))
    typo = str(tiny["adapter"]) + "x"
    result = CliRunner().invoke(main, ["sanitize", "--base", str(tiny["base"]), "--harmful", str(tiny["target"]),
                                       "--target", f"{tiny['base']}+{typo}", "--out", str(tmp_path / "o"), "-q"])
    err = result.stderr.strip()
    assert result.exit_code != 0 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {typo}: no such adapter folder"), err
    assert not (tmp_path / "o").exists()


def test_diff_takes_a_base_plus_adapter_as_the_edited_model(tiny):
    """diff BASE BASE+ADAPTER: the adapter merged as sanitize reads it; exactly the tensors the
    adapter changes (by an independent float64 merge, rounded to the base's dtype) differ."""
    from ckptops.hdr.diff import diff_checkpoints

    report = diff_checkpoints(str(tiny["base"]), f"{tiny['base']}+{tiny['adapter']}", workers=1)
    base = load_folder(tiny["base"])
    changed = {name for name, d in _reference_delta(tiny["adapter"]).items()
               if not torch.equal((base[name].double() + d).to(base[name].dtype), base[name])}
    assert changed and {t.name for t in report.tensors if t.differ} == changed
    assert not report.not_compared
