"""compute_icv against an independent reference: own hooks, own numpy PCA with svd_flip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icv_fixtures import ARCHS, first_demo_records, make_model, make_tokenizer, reference_icv

import ckptops
from ckptops.errors import ICVError, UsageError
from ckptops.icv.demos import DemoPair

N_PAIRS = 8  # enough for a well-separated PC1, fast on every architecture


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _as_array(icv) -> np.ndarray:
    return np.stack([icv.vectors[i].numpy() for i in range(icv.num_layers)])


@pytest.mark.parametrize("arch", ARCHS)
def test_vector_matches_reference(arch, tokenizer):
    model = make_model(arch)
    records = first_demo_records(N_PAIRS)
    icv = ckptops.compute_icv(model, tokenizer, records)
    expected = reference_icv(model, tokenizer, arch, records)
    assert icv.num_layers == expected.shape[0] and icv.hidden_size == expected.shape[1]
    assert all(v.dtype == torch.float32 for v in icv.vectors.values())
    np.testing.assert_allclose(_as_array(icv), expected, atol=1e-5, rtol=0)
    assert np.abs(expected).max() > 1e-2  # the comparison is not between two near-zero vectors
    assert icv.model_type == model.config.model_type
    assert icv.num_demos == N_PAIRS and len(icv.demos_sha256) == 64


@pytest.mark.parametrize("positions,method", [("last", "pc1+mean"), ("last4", "pc1"), ("last", "pc1")])
def test_paper_variants_match_reference(positions, method, tokenizer):
    model = make_model("llama", seed=3)
    records = first_demo_records(N_PAIRS)
    icv = ckptops.compute_icv(model, tokenizer, records, positions=positions, method=method)
    expected = reference_icv(model, tokenizer, "llama", records, positions=positions, method=method)
    np.testing.assert_allclose(_as_array(icv), expected, atol=1e-5, rtol=0)
    assert (icv.positions, icv.method) == (positions, method)


def test_variants_really_differ(tokenizer):
    """Guards the tests above: the options must change the vector, or they could not catch a mix-up."""
    model = make_model("qwen2")
    records = first_demo_records(N_PAIRS)
    official = _as_array(ckptops.compute_icv(model, tokenizer, records))
    last = _as_array(ckptops.compute_icv(model, tokenizer, records, positions="last"))
    pc1 = _as_array(ckptops.compute_icv(model, tokenizer, records, method="pc1"))
    assert np.abs(official - last).max() > 1e-3
    assert np.abs(official - pc1).max() > 1e-3
    assert abs(np.linalg.norm(pc1) - 1.0) < 1e-5  # PC1 alone is a unit vector over all layers


def test_layer_subset(tokenizer):
    model = make_model("gpt2")
    records = first_demo_records(N_PAIRS)
    full = ckptops.compute_icv(model, tokenizer, records)
    assert full.layers == [0, 1, 2]
    subset = ckptops.compute_icv(model, tokenizer, records, layers=[1, 2])
    assert subset.layers == [1, 2]
    for i in (1, 2):  # PCA over all layers, as the official code; only the kept layers are stored
        assert torch.equal(subset.vectors[i], full.vectors[i])


def test_pairs_in_any_form_give_the_same_vector(tokenizer):
    model = make_model("llama")
    records = first_demo_records(4)
    as_dicts = ckptops.compute_icv(model, tokenizer, records)
    as_tuples = ckptops.compute_icv(model, tokenizer, [(r["question"], r["unsafe"]) for r in records])
    as_pairs = ckptops.compute_icv(model, tokenizer, [DemoPair(r["question"], r["unsafe"]) for r in records])
    for i in as_dicts.layers:
        assert torch.equal(as_dicts.vectors[i], as_tuples.vectors[i])
        assert torch.equal(as_dicts.vectors[i], as_pairs.vectors[i])
    assert as_dicts.demos_sha256 == as_tuples.demos_sha256 == as_pairs.demos_sha256


def test_refusals(tokenizer):
    model = make_model("llama")
    one = first_demo_records(1)
    with pytest.raises(ICVError, match="at least 2"):
        ckptops.compute_icv(model, tokenizer, one)
    with pytest.raises(ICVError, match="no variance"):
        ckptops.compute_icv(model, tokenizer, one * 3)
    with pytest.raises(UsageError, match="positions"):
        ckptops.compute_icv(model, tokenizer, first_demo_records(2), positions="first")
    with pytest.raises(UsageError, match="method"):
        ckptops.compute_icv(model, tokenizer, first_demo_records(2), method="pc2")
    with pytest.raises(UsageError, match="not in 0..2"):
        ckptops.compute_icv(model, tokenizer, first_demo_records(2), layers=[3])


def test_a_demonstration_longer_than_the_context_window_is_refused_before_any_forward_pass(tokenizer):
    model = make_model("llama")  # max_position_embeddings 256
    model.register_forward_pre_hook(lambda *args: pytest.fail("the model ran"))
    pairs = first_demo_records(2) + [{"question": "how " * 300, "unsafe": "sure"}]
    # "<s> question : how x300 answer : sure": 1 + 2 + 300 + 2 + 1 = 306 tokens (checked before the safe text)
    with pytest.raises(ICVError, match=r"^demonstration pair 2: the unsafe demonstration is 306 tokens, over the "
                                       r"model's context window of 256 tokens"):
        ckptops.compute_icv(model, tokenizer, pairs)


def test_non_float32_model_is_warned_about(tokenizer):
    model = make_model("llama", dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="float32"):
        icv = ckptops.compute_icv(model, tokenizer, first_demo_records(3))
    assert icv.extra["compute_dtype"] == "bfloat16"
    assert all(v.dtype == torch.float32 for v in icv.vectors.values())
