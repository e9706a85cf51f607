"""The additive rule: x + s*m_l*v/|v| on each steered layer's MLP output, against hooks and a
median written here; the file keeps it (format 2) while official files stay format 1."""

from __future__ import annotations

import copy

import pytest
import torch

import ckptops
from ckptops.errors import ICVError
from ckptops.icv.compute import compute_icv
from ckptops.icv.file import ICV, load_icv
from tests.icv_fixtures import (HIDDEN, LAYERS, decoder_layers, first_demo_records, logits_of, make_model,
                                make_tokenizer, mlp_site_name)


def _icv(arch: str, layers=(0, 2), alpha: float = 0.12, rule: str = "additive") -> ICV:
    generator = torch.Generator().manual_seed(5)
    return ICV(vectors={i: torch.randn(HIDDEN, generator=generator) for i in layers}, hidden_size=HIDDEN,
               num_layers=LAYERS, rule=rule, alpha=alpha, model_type=arch, mlp_norms={i: 10.0 + 5 * i for i in layers})


def _reference_logits(model, arch: str, icv: ICV, alpha: float) -> torch.Tensor:
    tokenizer = make_tokenizer()
    handles = []
    for i, layer in enumerate(decoder_layers(model, arch)):
        if i in icv.vectors:
            v = icv.vectors[i].double()
            shift = (0.1 * alpha * icv.mlp_norms[i] * v / v.norm()).float()
            site = getattr(layer, mlp_site_name(arch))
            handles.append(site.register_forward_hook(lambda m, a, out, u=shift: out + u))
    try:
        return logits_of(model, tokenizer)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2"])
def test_apply_additive_matches_in_test_hooks(arch):
    model = make_model(arch)
    tokenizer = make_tokenizer()
    icv = _icv(arch)
    plain = logits_of(model, tokenizer)
    expected = _reference_logits(model, arch, icv, 0.12)
    assert (expected - plain).abs().max() > 1e-3
    with ckptops.apply_icv(model, icv):
        torch.testing.assert_close(logits_of(model, tokenizer), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits_of(model, tokenizer), plain)
    # an official file with recorded norms runs additively on request, with the additive scale factor
    official = _icv(arch, rule="official")
    expected = _reference_logits(model, arch, icv, 0.3)
    with ckptops.apply_icv(model, official, rule="additive", alpha=0.3):
        torch.testing.assert_close(logits_of(model, tokenizer), expected, rtol=1e-5, atol=1e-5)


def test_a_file_without_norms_cannot_run_additively(tmp_path):
    old = _icv("llama", rule="official")
    old = ICV(**{**old.__dict__, "mlp_norms": {}})
    path = old.save(tmp_path / "old.safetensors")
    with pytest.raises(ICVError, match=r"old\.safetensors: .*--rule additive"):
        ckptops.apply_icv(make_model("llama"), path, rule="additive")


def test_file_versions(tmp_path):
    from safetensors import safe_open

    additive = _icv("llama").save(tmp_path / "a.safetensors")
    official = _icv("llama", rule="official").save(tmp_path / "o.safetensors")
    with safe_open(additive, "pt") as handle:
        assert handle.metadata()["format_version"] == "2"
    with safe_open(official, "pt") as handle:
        assert handle.metadata()["format_version"] == "1"  # older ckptops keep reading it
    loaded = load_icv(additive)
    assert loaded.rule == "additive" and loaded.mlp_norms == {0: 10.0, 2: 20.0}


def test_compute_records_the_median_mlp_output_norm():
    model = make_model("llama")
    tokenizer = make_tokenizer()
    records = first_demo_records(4)
    icv = compute_icv(copy.deepcopy(model), tokenizer, records, rule="additive", layers=[1, 2])
    # reference: every token's MLP-output norm over all demonstration sequences, lower median
    norms = {i: [] for i in range(LAYERS)}
    hooks = [layer.mlp.register_forward_hook(lambda m, a, out, i=i: norms[i].append(out[0].norm(dim=-1)))
             for i, layer in enumerate(decoder_layers(model, "llama"))]
    from tests.icv_fixtures import demo_texts

    with torch.no_grad():
        for unsafe, safe in demo_texts(records):
            for text in (unsafe, safe):
                model(tokenizer(text, return_tensors="pt").input_ids)
    for hook in hooks:
        hook.remove()
    for i in (1, 2):
        values = torch.cat(norms[i]).double().sort().values
        assert icv.mlp_norms[i] == pytest.approx(float(values[(len(values) - 1) // 2]), rel=1e-6)
    assert set(icv.mlp_norms) == {1, 2} and icv.rule == "additive" and icv.strength == pytest.approx(0.012)
