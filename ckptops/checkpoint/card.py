"""The model card (README.md with Hugging Face front matter) of a sanitized checkpoint.

It records what a reader needs to trust and repeat the result: the method and its exact
parameters, and the identity of every input (Hub repo + commit, or local path + content hash).
The front matter carries ``base_model`` (the target) and the ``safety-arithmetic``/``ckptops``
tags that mark a checkpoint as already sanitized.
"""

from __future__ import annotations

import json

TAGS = ["safety-arithmetic", "ckptops"]


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar


def base_model_id(identity: dict, ref: str) -> str:
    """The Hub id of the target when known, else the name the user gave it."""
    if identity.get("type") == "hub":
        return identity["repo"]
    return identity.get("hub_id") or ref.rstrip("/").split("/")[-1] or ref


def render_card(provenance: dict) -> str:
    """README.md text for the output folder, from the provenance record written beside it."""
    params = provenance["parameters"]
    inputs = provenance["inputs"]
    report = provenance.get("report", {})
    target = inputs["target"]
    lines = [
        "---",
        f"base_model: {_yaml_str(base_model_id(target, target.get('ref', '')))}",
        "tags:",
        *[f"- {tag}" for tag in TAGS],
        "library_name: transformers",
        "---",
        "",
        f"# {provenance.get('title', 'Sanitized model')}",
        "",
        "This checkpoint was produced by [ckptops](https://pypi.org/project/ckptops/) with "
        "**Harm Direction Removal** from *Safety Arithmetic* (Hazra et al., EMNLP 2024): the top-k "
        "pruned harm vector tau = theta_harmful - theta_base was subtracted from the target's weights,",
        "theta = theta_target - scale * (|tau| >= t) * tau, with no training.",
        "",
        "Safety Arithmetic lowers harmful compliance on the paper's 7B models; on a model that has "
        "not lost safety, or on small models, it can hurt. Evaluate before you rely on it.",
        "",
        "## Parameters",
        "",
        "| parameter | value |",
        "|---|---|",
    ]
    for key, value in params.items():
        lines.append(f"| {key} | `{value}` |")
    lines += ["", "## Inputs", "", "| role | reference | identity |", "|---|---|---|"]
    for role in ("base", "harmful", "target"):
        ident = inputs[role]
        if ident.get("type") == "hub":
            who = f"commit `{ident.get('commit')}`"
        else:
            kind = ident.get("hash_kind", "fingerprint")
            who = f"{kind} `{ident.get('sha256', '')}`"
        lines.append(f"| {role} | `{ident.get('ref', '')}` | {who} |")
    if report:
        lines += [
            "",
            "## Result",
            "",
            f"- tensors changed: {report.get('tensors_changed')} of {report.get('tensors_total')}",
            f"- values changed: {report.get('values_changed')} of {report.get('values_selected_over')} "
            f"({100 * report.get('fraction_kept', 0):.3f}%)",
        ]
        for group, threshold in list(report.get("thresholds", {}).items())[:8]:
            lines.append(f"- threshold ({group}): {threshold}")
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")",
        "```",
        "",
        "If the folder holds `icv.safetensors` (the Safe-Align in-context vector), load it with",
        "`ckptops.from_pretrained(folder)` to apply the vector as well.",
        "",
        "`ckptops.json` beside this card holds the same provenance as machine-readable JSON.",
        "",
    ]
    return "\n".join(lines)
