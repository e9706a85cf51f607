"""Shared fixtures: small Llama-shaped checkpoint triples written with safetensors itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

@pytest.fixture(params=["fused", "torch"])
def engine_path(request, monkeypatch):
    """Run a test on both engine code paths: the fused C loops and the torch ops. Where the
    extension is not built, the fused run is skipped (``CKPTOPS_REQUIRE_FUSED=1``, set by CI,
    turns that into a failure)."""
    from ckptops.hdr import fused

    if request.param == "fused":
        if fused._fused is None:
            if os.environ.get("CKPTOPS_REQUIRE_FUSED") == "1":
                pytest.fail("the fused extension ckptops.hdr._fused is not built")
            pytest.skip("the fused extension is not built")
        monkeypatch.delenv("CKPTOPS_NO_FUSED", raising=False)
    else:
        monkeypatch.setenv("CKPTOPS_NO_FUSED", "1")
    return request.param


CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2,
}


def llama_state(seed: int, dtype=torch.bfloat16, vocab: int = 96, base: dict | None = None,
                scale: float = 0.02, delta: float = 0.0) -> dict[str, torch.Tensor]:
    """A tiny LlamaForCausalLM state dict; with ``base`` given, base plus a random delta."""
    g = torch.Generator().manual_seed(seed)
    h, inter, layers, kv = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["num_hidden_layers"], 16
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (vocab, h)})
    state = {}
    for name, shape in shapes.items():
        if base is not None and name in base and base[name].shape == torch.Size(shape):
            value = base[name].float() + delta * torch.randn(shape, generator=g)
        else:
            value = scale * torch.randn(shape, generator=g) + (1.0 if name.endswith("norm.weight") else 0.0)
        state[name] = value.to(dtype).contiguous()
    return state


def write_folder(folder: Path, state: dict[str, torch.Tensor], shards: int = 1, config: dict | None = None) -> Path:
    """Write ``state`` as a HF folder: one model.safetensors, or ``shards`` files plus an index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map, per = {}, -(-len(names) // shards)
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: state[n] for n in names[i * per:(i + 1) * per]}
            save_file(part, str(folder / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = dict(config or CONFIG)
    if "vocab_size" in cfg and "model.embed_tokens.weight" in state:
        cfg["vocab_size"] = state["model.embed_tokens.weight"].shape[0]
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return folder


@pytest.fixture
def triple(tmp_path):
    """base / harmful / target folders (bf16, target sharded in 3) and their state dicts."""
    base = llama_state(0)
    harmful = llama_state(1, base=base, delta=0.01)
    target = llama_state(2, base=base, delta=0.004)
    paths = {
        "base": write_folder(tmp_path / "base", base),
        "harmful": write_folder(tmp_path / "harmful", harmful, shards=2),
        "target": write_folder(tmp_path / "target", target, shards=3),
    }
    return paths, {"base": base, "harmful": harmful, "target": target}
