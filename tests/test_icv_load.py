"""Loading: ckptops.from_pretrained, patch_transformers(), and low-RAM loading for compute."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from icv_fixtures import first_demo_records, logits_of, make_model, make_tokenizer, save_checkpoint, wrap_official

import ckptops
from ckptops.errors import CheckpointError, ICVError, UsageError
from ckptops.icv.file import ICV
from ckptops.icv.load import checkpoint_sha256, load_model
from ckptops.icv.patch import icv_handle, unpatch_transformers

ALPHA = 2.0


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """Two copies of one tiny Llama checkpoint: one carrying icv.safetensors, one without."""
    root = tmp_path_factory.mktemp("ckpts")
    model = make_model("llama", seed=5)
    plain = save_checkpoint(model, tokenizer, root / "plain")
    steered = save_checkpoint(model, tokenizer, root / "steered")
    generator = torch.Generator().manual_seed(11)
    icv = ICV(vectors={i: torch.randn(32, generator=generator) for i in range(3)}, hidden_size=32, num_layers=3,
              alpha=ALPHA, model_type="llama")
    icv.save(steered / "icv.safetensors")
    expected = logits_of(wrap_official(copy.deepcopy(model), "llama", icv.vectors, 0.1 * ALPHA), tokenizer)
    return {"plain": plain, "steered": steered, "expected": expected, "unsteered": logits_of(model, tokenizer)}


@pytest.fixture
def restore_transformers():
    yield
    unpatch_transformers()


def test_from_pretrained_applies_the_folder_icv(folders, tokenizer):
    model = ckptops.from_pretrained(folders["steered"])
    torch.testing.assert_close(logits_of(model, tokenizer), folders["expected"], rtol=1e-5, atol=1e-5)
    handle = icv_handle(model)
    assert handle is not None and handle.alpha == ALPHA
    handle.remove()
    assert torch.equal(logits_of(model, tokenizer), folders["unsteered"])


def test_from_pretrained_without_icv_file_leaves_the_model_alone(folders, tokenizer):
    model = ckptops.from_pretrained(folders["plain"])
    assert icv_handle(model) is None
    assert torch.equal(logits_of(model, tokenizer), folders["unsteered"])
    assert icv_handle(ckptops.from_pretrained(folders["steered"], icv=False)) is None
    explicit = ckptops.from_pretrained(folders["plain"], icv=folders["steered"] / "icv.safetensors")
    torch.testing.assert_close(logits_of(explicit, tokenizer), folders["expected"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ICVError, match="holds no icv.safetensors"):
        ckptops.from_pretrained(folders["plain"], icv=True)


def test_patch_transformers(folders, tokenizer, restore_transformers):
    from transformers import AutoModelForCausalLM

    ckptops.patch_transformers()
    ckptops.patch_transformers()  # idempotent: still one layer of patching
    steered = AutoModelForCausalLM.from_pretrained(folders["steered"])
    torch.testing.assert_close(logits_of(steered, tokenizer), folders["expected"], rtol=1e-5, atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(folders["plain"])
    assert icv_handle(plain) is None and torch.equal(logits_of(plain, tokenizer), folders["unsteered"])
    # ckptops.from_pretrained does not apply the file twice when transformers is patched
    model = ckptops.from_pretrained(folders["steered"])
    torch.testing.assert_close(logits_of(model, tokenizer), folders["expected"], rtol=1e-5, atol=1e-5)

    unpatch_transformers()
    again = AutoModelForCausalLM.from_pretrained(folders["steered"])
    assert icv_handle(again) is None and torch.equal(logits_of(again, tokenizer), folders["unsteered"])


def test_mismatched_folder_icv_is_refused(tmp_path, tokenizer):
    folder = save_checkpoint(make_model("gpt2"), tokenizer, tmp_path / "gpt2")
    ICV(vectors={0: torch.ones(48)}, hidden_size=48, num_layers=3).save(folder / "icv.safetensors")
    with pytest.raises(ICVError, match=r"icv.safetensors: .*hidden size 48 and 3 layers.*hidden size 32 and 3 layers"):
        ckptops.from_pretrained(folder)


def test_low_memory_load_offloads_and_gives_the_same_vector(folders):
    records = first_demo_records(6)
    with load_model(folders["plain"], quiet=True) as full:
        assert full.source_sha256 == checkpoint_sha256(folders["plain"])
        reference = ckptops.compute_icv(full.model, full.tokenizer, records)
    with load_model(folders["plain"], max_memory="60KB", quiet=True) as low:
        assert "disk" in set(low.device_map.values())
        offload_dir = low.offload_dir
        offloaded = ckptops.compute_icv(low.model, low.tokenizer, records)
    assert not __import__("os").path.exists(offload_dir)  # the temporary offload folder is cleaned up
    for i in reference.layers:
        np.testing.assert_allclose(offloaded.vectors[i].numpy(), reference.vectors[i].numpy(), atol=1e-5, rtol=0)


def test_source_identity_changes_with_the_weights(tmp_path, tokenizer):
    a = save_checkpoint(make_model("llama", seed=1), tokenizer, tmp_path / "a")
    b = save_checkpoint(make_model("llama", seed=2), tokenizer, tmp_path / "b")
    assert checkpoint_sha256(a) != checkpoint_sha256(b)
    assert len(checkpoint_sha256(a)) == 64


def test_pickle_only_and_missing_folders_are_refused(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(CheckpointError, match=r"no \*.safetensors weight files .*never loads pickled"):
        load_model(folder)
    with pytest.raises(CheckpointError, match="no such model folder"):
        load_model(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="not a model folder"):
        load_model(folder / "config.json")
    with pytest.raises(UsageError, match="--max-memory"):
        load_model(folder, max_memory="lots")
