"""apply_icv against the official module surgery, exact removal, KV cache, device maps."""

from __future__ import annotations

import copy

import pytest
import torch

from icv_fixtures import (ARCHS, ARCH_CONFIGS, logits_of, make_model, make_tokenizer,
                          paper_rule_hooks, save_checkpoint, wrap_official)

import ckptops
from ckptops.errors import ICVError, UsageError
from ckptops.icv.file import ICV
from ckptops.icv.patch import icv_handle

ALPHA = 2.0  # 10x the strength used by the paper-scale tests below: large enough to move the logits


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _random_icv(arch: str, layers=None, seed: int = 0, **kw) -> ICV:
    """An ICV with random vectors: the patch must not care where the vectors came from."""
    config = ARCH_CONFIGS[arch]
    hidden = config.get("hidden_size", config.get("n_embd"))
    num_layers = config.get("num_hidden_layers", config.get("n_layer"))
    generator = torch.Generator().manual_seed(seed)
    chosen = range(num_layers) if layers is None else layers
    vectors = {i: torch.randn(hidden, generator=generator) for i in chosen}
    return ICV(vectors=vectors, hidden_size=hidden, num_layers=num_layers, model_type=arch, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_official_rule_matches_official_module_surgery(arch, tokenizer):
    model = make_model(arch)
    icv = _random_icv(arch, alpha=ALPHA)
    before = logits_of(model, tokenizer)
    reference_model = wrap_official(copy.deepcopy(model), arch, icv.vectors, 0.1 * ALPHA)
    expected = logits_of(reference_model, tokenizer)

    handle = ckptops.apply_icv(model, icv)
    steered = logits_of(model, tokenizer)
    assert handle.strength == pytest.approx(0.1 * ALPHA)
    torch.testing.assert_close(steered, expected, rtol=1e-5, atol=1e-5)
    assert (steered - before).abs().max() > 1e-3  # the steering is visible, so the comparison means something

    handle.remove()
    assert torch.equal(logits_of(model, tokenizer), before)  # bit-identical after remove()
    assert icv_handle(model) is None


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_paper_rule_matches_reference(arch, tokenizer):
    model = make_model(arch)
    icv = _random_icv(arch, layers=[1, 2], rule="paper", alpha=0.5, scale_factor=1.0)
    before = logits_of(model, tokenizer)
    handles = paper_rule_hooks(model, arch, icv.vectors, 0.5)
    expected = logits_of(model, tokenizer)
    for h in handles:
        h.remove()
    with ckptops.apply_icv(model, icv) as handle:
        assert handle.rule == "paper" and handle.layers == [1, 2]
        steered = logits_of(model, tokenizer)
    torch.testing.assert_close(steered, expected, rtol=1e-5, atol=1e-5)
    assert (steered - before).abs().max() > 1e-3
    assert torch.equal(logits_of(model, tokenizer), before)


def test_only_listed_layers_are_steered(tokenizer):
    model = make_model("mistral")
    icv = _random_icv("mistral", layers=[2], alpha=ALPHA)
    expected = logits_of(wrap_official(copy.deepcopy(model), "mistral", icv.vectors, 0.1 * ALPHA), tokenizer)
    everywhere = logits_of(wrap_official(copy.deepcopy(model), "mistral", _random_icv("mistral", alpha=ALPHA).vectors,
                                         0.1 * ALPHA), tokenizer)
    with ckptops.apply_icv(model, icv):
        steered = logits_of(model, tokenizer)
    torch.testing.assert_close(steered, expected, rtol=1e-5, atol=1e-5)
    assert (steered - everywhere).abs().max() > 1e-4


def test_alpha_and_rule_overrides(tokenizer):
    model = make_model("llama")
    icv = _random_icv("llama")  # official defaults: alpha 0.12, s = 0.012
    with ckptops.apply_icv(model, icv, alpha=ALPHA) as handle:
        assert (handle.alpha, handle.strength) == (ALPHA, pytest.approx(0.1 * ALPHA))
        steered = logits_of(model, tokenizer)
    expected = logits_of(wrap_official(copy.deepcopy(model), "llama", icv.vectors, 0.1 * ALPHA), tokenizer)
    torch.testing.assert_close(steered, expected, rtol=1e-5, atol=1e-5)
    with ckptops.apply_icv(model, icv, rule="paper") as handle:
        assert (handle.rule, handle.strength) == ("paper", pytest.approx(0.12))
    with pytest.raises(UsageError):
        ckptops.apply_icv(model, icv, rule="sideways")
    with pytest.raises(UsageError):
        ckptops.apply_icv(model, icv, alpha=float("nan"))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_kv_cache_generation_matches_no_cache(arch, tokenizer):
    model = make_model(arch)
    icv = _random_icv(arch, alpha=ALPHA)
    ids = tokenizer("Question: How do I make a fake ID?\n    Answer:", return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=3, output_logits=True,
                  return_dict_in_generate=True)
    plain = model.generate(ids, use_cache=True, **kwargs)
    with ckptops.apply_icv(model, icv):
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # generated positions are steered too: the per-step logits move, not just the prompt's
    moved = max(float((a - b).abs().max()) for a, b in zip(cached.logits[1:], plain.logits[1:]))
    assert moved > 1e-3


def test_mismatched_icv_is_refused_naming_both(tokenizer):
    model = make_model("llama")
    wider = ICV(vectors={0: torch.ones(48)}, hidden_size=48, num_layers=3)
    with pytest.raises(ICVError, match=r"hidden size 48 and 3 layers.*hidden size 32 and 3 layers"):
        ckptops.apply_icv(model, wider)
    deeper = ICV(vectors={0: torch.ones(32)}, hidden_size=32, num_layers=5)
    with pytest.raises(ICVError, match=r"hidden size 32 and 5 layers.*hidden size 32 and 3 layers"):
        ckptops.apply_icv(model, deeper)


def test_second_application_is_refused_until_removed(tokenizer):
    model = make_model("llama")
    handle = ckptops.apply_icv(model, _random_icv("llama"))
    with pytest.raises(ICVError, match="already applied"):
        ckptops.apply_icv(model, _random_icv("llama", seed=1))
    handle.remove()
    handle.remove()  # idempotent
    ckptops.apply_icv(model, _random_icv("llama", seed=1)).remove()


def test_bfloat16_model_is_steered_in_float32_and_cast_back(tokenizer):
    model = make_model("llama", dtype=torch.bfloat16)
    icv = _random_icv("llama", alpha=ALPHA)
    expected = logits_of(wrap_official(copy.deepcopy(model), "llama", icv.vectors, 0.1 * ALPHA), tokenizer)
    with ckptops.apply_icv(model, icv):
        steered = logits_of(model, tokenizer)
    assert steered.dtype == torch.bfloat16
    assert torch.equal(steered, expected)  # same float32 math, same single cast


def test_accelerate_disk_offload(tmp_path, tokenizer):
    """A model split across CPU and disk by an accelerate device map is steered identically."""
    from transformers import AutoModelForCausalLM

    folder = save_checkpoint(make_model("llama"), tokenizer, tmp_path / "ckpt")
    in_memory = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    offloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="auto",
                                                     max_memory={"cpu": 60_000}, offload_folder=str(tmp_path / "off"))
    assert "disk" in set(offloaded.hf_device_map.values())
    icv = _random_icv("llama", alpha=ALPHA)
    before = logits_of(offloaded, tokenizer)
    with ckptops.apply_icv(in_memory, icv):
        expected = logits_of(in_memory, tokenizer)
    with ckptops.apply_icv(offloaded, icv):
        steered = logits_of(offloaded, tokenizer)
    torch.testing.assert_close(steered, expected, rtol=1e-5, atol=1e-5)
    assert (steered - before).abs().max() > 1e-3
    assert torch.equal(logits_of(offloaded, tokenizer), before)
