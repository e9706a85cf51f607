"""Generate Llama-shaped model folders with random weights: the demo's embedded default and the
benchmark's inputs, with no network.

A *triple* is what HDR needs: ``base`` (random, std 0.02), ``harmful`` (base plus a dense small
delta and a sparse larger one, the "harm direction") and ``target`` (base plus its own delta).
Tensors are generated chunk by chunk and written with the same streaming writer as sanitize, so
generating a 7B preset needs little memory.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ckptops.checkpoint.dtypes import itemsize, torch_dtype
from ckptops.checkpoint.reader import byte_view
from ckptops.checkpoint.publish import write_index
from ckptops.checkpoint.writer import OutTensor, ShardWriter, layout_by_size


@dataclass(frozen=True)
class Preset:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


PRESETS: dict[str, Preset] = {
    "tiny": Preset(64, 176, 4, 4, 2, 512),
    "small": Preset(512, 1408, 8, 8, 4, 8000),
    "1b": Preset(2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B shapes
    "7b": Preset(4096, 11008, 32, 32, 32, 32000),  # Llama-2-7B shapes
}


def llama_tensors(p: Preset) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a LlamaForCausalLM with untied embeddings, in HF order."""
    head_dim = p.hidden // p.heads
    kv = p.kv_heads * head_dim
    names = [("model.embed_tokens.weight", (p.vocab, p.hidden))]
    for i in range(p.layers):
        pre = f"model.layers.{i}."
        names += [
            (pre + "self_attn.q_proj.weight", (p.hidden, p.hidden)),
            (pre + "self_attn.k_proj.weight", (kv, p.hidden)),
            (pre + "self_attn.v_proj.weight", (kv, p.hidden)),
            (pre + "self_attn.o_proj.weight", (p.hidden, p.hidden)),
            (pre + "mlp.gate_proj.weight", (p.intermediate, p.hidden)),
            (pre + "mlp.up_proj.weight", (p.intermediate, p.hidden)),
            (pre + "mlp.down_proj.weight", (p.hidden, p.intermediate)),
            (pre + "input_layernorm.weight", (p.hidden,)),
            (pre + "post_attention_layernorm.weight", (p.hidden,)),
        ]
    names += [("model.norm.weight", (p.hidden,)), ("lm_head.weight", (p.vocab, p.hidden))]
    return names


def llama_config(p: Preset, dtype: str = "bfloat16") -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": p.hidden,
        "intermediate_size": p.intermediate,
        "num_hidden_layers": p.layers,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads,
        "vocab_size": p.vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }


_POOL = 1 << 22
_pools: dict[tuple[int, str], torch.Tensor] = {}


def _pool(seed: int, tag: str) -> torch.Tensor:
    """A fixed block of 2 x 4M standard normal values per (seed, tag); slices of it at
    name-dependent offsets stand in for fresh noise at a fraction of the cost (generating a 7B
    triple from fresh ``randn`` takes tens of minutes on two cores)."""
    key = (seed, tag)
    if key not in _pools:
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{tag}".encode()))
        _pools[key] = torch.randn(2 * _POOL, generator=g)
    return _pools[key]


def _noise(seed: int, tag: str, name: str, start: int, count: int) -> torch.Tensor:
    offset = zlib.crc32(f"{name}:{start}".encode()) % _POOL
    pool = _pool(seed, tag)
    if count <= _POOL:
        return pool[offset:offset + count]
    return torch.cat([pool[offset:offset + _POOL], _noise(seed, tag, name, start + _POOL, count - _POOL)])


def _values(name: str, role: str, seed: int, start: int, count: int, is_norm: bool) -> torch.Tensor:
    """Float32 values of elements [start, start+count) of one tensor of one role, deterministic."""
    base = _noise(seed, "base", name, start, count)
    base = (1.0 + 0.05 * base) if is_norm else 0.02 * base
    if role == "base":
        return base
    values = base + 0.002 * _noise(seed, role, name, start, count)
    if role == "harmful":  # a sparse, larger "harm direction" on top of small dense drift
        spikes = _noise(seed, "spikes", name, start, count)
        values += torch.where(spikes.abs() > 1.96, 0.01 * spikes, 0.0)  # ~5% of entries
    return values


def write_model(folder: Path, preset: str | Preset, role: str, *, seed: int = 0, dtype: str = "BF16",
                shard_size: int = 2 * 10**9, chunk: int = 1 << 22) -> Path:
    """Write one model folder (config + sharded safetensors + index) for ``role``."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = [OutTensor(n, dtype, s) for n, s in llama_tensors(p)]
    shards = layout_by_size(tensors, shard_size)
    writer = ShardWriter(folder, shards, {"format": "pt"})
    try:
        out = torch.empty(chunk, dtype=torch_dtype(dtype))
        for tensor in tensors:
            n = math.prod(tensor.shape)
            for start in range(0, n, chunk):
                count = min(chunk, n - start)
                values = _values(tensor.name, role, seed, start, count, tensor.name.endswith("norm.weight"))
                out[:count].copy_(values)
                writer.write(tensor.name, start * itemsize(dtype), byte_view(out[:count]))
        writer.finish()
    finally:
        writer.close()
    if len(shards) > 1:
        write_index(folder, writer.weight_map(), writer.total_bytes())
    config_dtype = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype]
    (folder / "config.json").write_text(json.dumps(llama_config(p, config_dtype), indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    from ckptops import demo_tokenizer

    if demo_tokenizer.available():  # so that generate / icv compute / eval / run work on it too
        demo_tokenizer.write_tokenizer(folder, p.vocab)
    return folder


def write_triple(root: Path, preset: str = "tiny", *, seed: int = 0, dtype: str = "BF16",
                 shard_size: int = 2 * 10**9) -> dict[str, Path]:
    """``root/base``, ``root/harmful``, ``root/target`` for a preset; returns the three paths."""
    root = Path(root)
    return {role: write_model(root / role, preset, role, seed=seed, dtype=dtype, shard_size=shard_size)
            for role in ("base", "harmful", "target")}
