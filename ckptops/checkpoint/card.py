"""The model card (README.md with Hugging Face front matter) of a sanitized checkpoint.

It records what a reader needs to trust and repeat the result: the method and its exact
parameters, and the identity of every input (Hub repo + commit, or the reference given + content
hash). The front matter is built with ``huggingface_hub.ModelCardData`` so that the Hub reads it
as it reads every other card: ``base_model`` (the target), the ``safety-arithmetic``/``ckptops``
tags that mark a checkpoint as already sanitized, and a ``safety_arithmetic`` block holding the
parameters and inputs in machine-readable form.
"""

from __future__ import annotations

TAGS = ["safety-arithmetic", "ckptops"]


def base_model_id(identity: dict, ref: str = "") -> str | None:
    """The Hub id of the target when known (a Hub input, or BASE+ADAPTER over a Hub base), else
    None and the card has no ``base_model``: that key links a Hub model, and a local folder's
    name (``target``, or ``gpt2`` for a folder that is not that model) would link a wrong one
    once the card is pushed. The card's inputs block still names the local reference."""
    if identity.get("type") == "hub":
        return identity["repo"]
    return identity.get("hub_id") or None


def input_summary(identity: dict) -> dict:
    """What the front matter records about one input: repo, revision and commit for a Hub
    input; the reference given and its content hash for a local one (never an absolute path)."""
    if identity.get("type") == "hub":
        return {"repo": identity["repo"], "revision": identity.get("revision"), "commit": identity.get("commit")}
    return {"ref": identity.get("ref", ""), identity.get("hash_kind", "fingerprint").replace(" ", "_"): identity.get("sha256", "")}


def front_matter(provenance: dict):
    """The card's metadata as a ``huggingface_hub.ModelCardData``.

    Imported from ``huggingface_hub.repocard_data``: the top-level ``ModelCard`` pulls in the
    HTTP stack (~0.3 s), which a local sanitize run would pay at its very end for nothing."""
    from huggingface_hub.repocard_data import ModelCardData

    inputs = provenance["inputs"]
    target = inputs["target"]
    block = dict(provenance["parameters"])
    block["inputs"] = {role: input_summary(inputs[role]) for role in ("base", "harmful", "target")}
    return ModelCardData(
        base_model=base_model_id(target, target.get("ref", "")),
        tags=list(TAGS),
        library_name="transformers",
        pipeline_tag="text-generation",
        safety_arithmetic=block,
    )


def parameter_rows(params: dict) -> list[str]:
    """The card's "Parameters" heading and table; shared by the sanitize and bake cards."""
    lines = ["## Parameters", "", "| parameter | value |", "|---|---|"]
    return lines + [f"| {key} | `{value}` |" for key, value in params.items()]


def identity_cell(ident: dict) -> str:
    """How an input is identified in the card: a Hub repo at its commit, else the local hash."""
    if ident.get("type") == "hub":
        return f"`{ident.get('repo')}` at commit `{ident.get('commit')}`"
    return f"{ident.get('hash_kind', 'fingerprint')} `{ident.get('sha256', '')}`"


def drift_section(drift: dict | None, scale) -> list[str]:
    """The card's account of how the target had drifted from the base, against the harm vector
    (figures computed by sanitize, see ckptops' README "Will HDR help this target?")."""
    if not drift:
        return []
    o = drift["overall"]

    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"
    return [
        "",
        "## Drift of the target (d = theta_target - theta_base)",
        "",
        "| figure | value |",
        "|---|---|",
        f"| cos(d, tau) | {fmt(o['cos_tau'])} |",
        f"| cos(d, M tau) (M: the top-k selection) | {fmt(o['cos_masked_tau'])} |",
        f"| projection ⟨d, M tau⟩ / ‖M tau‖² | {fmt(o['projection'])} |",
        f"| ‖scale · M tau‖ / ‖d‖ at scale {scale} | {fmt(o['step_ratio'])} |",
        f"| ‖d − scale · M tau‖ / ‖d‖ | {fmt(o['residual_ratio'])} |",
        "",
        f"{'**Warning:** ' if drift['verdict']['warning'] else ''}{drift['verdict']['message']}.",
    ]


def render_card(provenance: dict, hub_repo: str | None = None) -> str:
    """README.md text for the output folder, from the provenance record written beside it.

    ``hub_repo`` (the repo the folder is pushed to) goes into the loading examples. The text is
    what ``str(huggingface_hub.ModelCard(...))`` gives for it (front matter, then the body)."""
    from ckptops.checkpoint.serving import BAKE_METHOD, render_bake_card, serving_section

    if provenance.get("parameters", {}).get("method") == BAKE_METHOD:
        return render_bake_card(provenance, hub_repo)

    params = provenance["parameters"]
    inputs = provenance["inputs"]
    report = provenance.get("report", {})
    lines = [
        f"# {provenance.get('title', 'Sanitized model')}",
        "",
        "This checkpoint was produced by ckptops with "
        "**Harm Direction Removal** from *Safety Arithmetic* (Hazra et al., EMNLP 2024): the top-k "
        "pruned harm vector tau = theta_harmful - theta_base was subtracted from the target's weights,",
        "theta = theta_target - scale * (|tau| >= t) * tau, with no training.",
        "",
        "Safety Arithmetic lowers harmful compliance on the paper's 7B models; on a model that has "
        "not lost safety, or on small models, it can hurt. Evaluate before you rely on it.",
        "",
    ]
    lines += parameter_rows(params)
    lines += ["", "## Inputs", "", "| role | reference | identity |", "|---|---|---|"]
    for role in ("base", "harmful", "target"):
        ident = inputs[role]
        lines.append(f"| {role} | `{ident.get('ref', '')}` | {identity_cell(ident)} |")
    if report:
        lines += [
            "",
            "## Result",
            "",
            f"- tensors changed: {report.get('tensors_changed')} of {report.get('tensors_total')}",
            f"- values selected by top-k: {report.get('values_selected')} of {report.get('values_selected_over')} "
            f"({100 * report.get('fraction_kept', 0):.3f}%)",
        ]
        for group, threshold in list(report.get("thresholds", {}).items())[:8]:
            lines.append(f"- threshold ({group}): {threshold}")
        lines += drift_section(report.get("drift"), params.get("scale"))
    where = hub_repo or "path/to/this/folder"
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        f"model = AutoModelForCausalLM.from_pretrained({where!r})",
        "```",
        "",
        "With the Safe-Align in-context vector (when the checkpoint holds `icv.safetensors`),",
        "load it through ckptops, which applies the vector with forward hooks:",
        "",
        "```python",
        "import ckptops",
    ]
    if hub_repo:
        lines += [
            "from huggingface_hub import snapshot_download",
            f"folder = snapshot_download({hub_repo!r})",
            "model = ckptops.from_pretrained(folder)  # applies folder/icv.safetensors when present",
        ]
    else:
        lines += [f"model = ckptops.from_pretrained({where!r})  # applies icv.safetensors when present"]
    lines += ["```"]
    lines += serving_section(where)
    lines += [
        "",
        "`ckptops.json` beside this card holds the same provenance as machine-readable JSON.",
        "",
    ]
    body = "\n".join(lines)
    return f"---\n{front_matter(provenance).to_yaml()}\n---\n\n{body}"
