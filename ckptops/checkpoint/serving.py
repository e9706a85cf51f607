"""The model card's "How to serve" section, and the card of a folder written by ``icv bake``.

Why a section of its own: a Safe-Align vector shipped as ``icv.safetensors`` only acts where
ckptops is imported at load time. Anyone serving the folder with vLLM, SGLang, MLX, Ollama or
llama.cpp silently gets the model *without* it, so every card says, per runtime, what to run.
"""

from __future__ import annotations

BAKE_METHOD = "icv-bake"


def serving_section(where: str, *, baked: bool = False) -> list[str]:
    """Markdown lines: how to serve this folder with each runtime."""
    lines = ["", "## How to serve", ""]
    if baked:
        lines += [
            "The safety vector is **in the weights** (as `down_proj` biases), so any runtime that loads a Llama",
            "checkpoint with `mlp_bias` serves the steered model, with no extra step:",
            "",
            f"- **transformers**: `AutoModelForCausalLM.from_pretrained({where!r})` (no ckptops needed).",
            f"- **vLLM / SGLang**: `vllm serve {where}`.",
            f"- **MLX**: `mlx_lm.generate --model {where} --prompt ...`.",
            "- **llama.cpp / Ollama**: convert first, `python convert_hf_to_gguf.py "
            f"{where} --outfile model.gguf`, then `llama-server -m model.gguf` (no control vector: it is baked in).",
            "",
            "Do not also apply an ICV at load time: that would steer twice.",
        ]
        return lines
    lines += [
        "This folder's weights do not carry the Safe-Align vector. When it holds `icv.safetensors`, the vector",
        "acts only where it is applied:",
        "",
        "- **transformers + ckptops** (any rule: official, paper, additive): "
        f"`ckptops.from_pretrained({where!r})` applies `icv.safetensors` with forward hooks.",
        "- **vLLM, SGLang, MLX, llama.cpp after conversion** (any runtime that loads weights): bake an "
        "additive-rule vector into the weights first,",
        "  `ckptops icv compute --model FOLDER --out icv.safetensors --rule additive` then",
        "  `ckptops icv bake --model FOLDER --icv icv.safetensors --out FOLDER-baked` (Llama, Mistral, Qwen2), "
        "and serve `FOLDER-baked` as a plain checkpoint.",
        "- **llama.cpp control vector**: `ckptops icv export-gguf icv.safetensors control.gguf` writes the additive "
        "rule's vector and prints the exact `llama-server` flags (`--control-vector-scaled control.gguf:1 "
        "--control-vector-layer-range A B`); llama.cpp cannot steer layer 0.",
        "",
        "Served any other way, the model runs **without** its Safe-Align vector.",
    ]
    return lines


def render_bake_card(provenance: dict, hub_repo: str | None = None) -> str:
    """README.md of a baked folder: what was baked, from what, and how to serve it."""
    from huggingface_hub.repocard_data import ModelCardData

    from ckptops.checkpoint.card import identity_cell, parameter_rows

    params = provenance["parameters"]
    inputs = provenance["inputs"]
    model = inputs.get("model", {})
    previous = provenance.get("previous")
    tags = ["ckptops", "safe-align"] + (["safety-arithmetic"] if previous else [])
    base = model.get("repo") or model.get("hub_id")  # a Hub id or nothing (see card.base_model_id)
    data = ModelCardData(base_model=base or None, tags=tags, library_name="transformers",
                         pipeline_tag="text-generation", safe_align={k: v for k, v in params.items()})
    lines = [
        f"# {provenance.get('title', 'Model with a baked safety vector')}",
        "",
        "This checkpoint was produced by ckptops `icv bake`: the Safe-Align "
        "in-context vector of *Safety Arithmetic* (Hazra et al., EMNLP 2024), applied with the **additive rule**, "
        "is stored in the weights. Each steered layer l adds u_l = s * m_l * v_l / |v_l| to its MLP output "
        "(s = strength, m_l = that layer's typical MLP-output norm), written as `mlp.down_proj.bias`; the "
        "gate/up biases and the biases of unsteered layers are zeros.",
        "",
        "Steering can over-refuse benign requests or break a small model. Evaluate before you rely on it.",
        "",
    ]
    lines += parameter_rows(params)
    lines += ["", "## Inputs", "", "| input | reference | identity |", "|---|---|---|"]
    lines.append(f"| model | `{model.get('ref', '')}` | {identity_cell(model)} |")
    icv = inputs.get("icv", {})
    lines.append(f"| ICV | `{icv.get('ref', '')}` | sha256 `{icv.get('sha256', '')}` |")
    if previous:
        lines += ["", "The input was itself produced by ckptops (`previous` in `ckptops.json` keeps its record)."]
    lines += serving_section(hub_repo or "path/to/this/folder", baked=True)
    lines += ["", "`ckptops.json` beside this card holds the same provenance as machine-readable JSON.", ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
