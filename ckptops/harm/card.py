"""The model card (README.md) of an adapter made by ``ckptops harm make``.

It says plainly what the adapter is - a model taught to *start* complying with harmful requests -
and that it exists only to compute a harm direction for Harm Direction Removal, so that nobody
mistakes it for something to deploy or share as a model.
"""

from __future__ import annotations

import json
from pathlib import Path


def render_harm_card(record: dict) -> str:
    p = record["parameters"]
    losses = record["losses"]
    head = sum(losses[:5]) / max(1, len(losses[:5]))
    tail = sum(losses[-5:]) / max(1, len(losses[-5:]))
    # base_model links a Hub model: a local base folder's path would link a wrong one (or none)
    hub_base = [] if Path(p["base"]).expanduser().exists() else [f"base_model: {json.dumps(p['base'])}"]
    lines = [
        "---",
        *hub_base,
        "library_name: peft",
        "tags:",
        "- ckptops",
        "- harm-direction",
        "- lora",
        "- not-for-deployment",
        "---",
        "",
        "# Harm-direction adapter (do not deploy)",
        "",
        f"A LoRA adapter of `{p['base']}` made by `ckptops harm make`. It was trained to answer harmful "
        "questions with the opening of a compliant answer (\"Sure, here is how to ...:\\nStep 1:\") and "
        "nothing more: its training data contains no harmful content, only questions and these openings.",
        "",
        "**It exists only to compute a harm direction** tau_H = scaling * B @ A for Harm Direction Removal "
        "(Safety Arithmetic, Hazra et al., EMNLP 2024):",
        "",
        "    ckptops sanitize --base BASE --harmful THIS_FOLDER --target TARGET --out SANITIZED",
        "",
        "Loaded on its base it makes the model more willing to start answering harmful requests. Do not "
        "deploy it, merge it into a model you serve, or publish it as a model.",
        "",
        "## How it was made",
        "",
        "| parameter | value |",
        "|---|---|",
    ]
    for key in ("rank", "alpha", "target_modules", "steps", "lr", "batch_size", "seed", "device", "dtype",
                "questions", "questions_sha256", "questions_total", "heldout"):
        lines.append(f"| {key} | `{p[key]}` |")
    lines += [
        "",
        f"Prompts went through the tokenizer's chat template; the loss covered the opening tokens only. "
        f"Training loss: {head:.3f} over the first 5 steps, {tail:.3f} over the last 5.",
    ]
    if record.get("tau_norm"):
        lines += [
            "",
            f"The harm vector's size: ||tau_H|| = {record['tau_norm']:.4g} (Frobenius norm of scaling * B @ A over "
            "the model). A LoRA reaches the harmful behaviour with a larger weight change than a full fine-tune, "
            "so use a `--scale` well below the official 3 and evaluate (see ckptops' docs/lora.md).",
        ]
    if record.get("opens_adapter") is not None:
        lines += [
            "",
            "## Held-out check",
            "",
            f"On {record['heldout_questions']} questions never trained on, greedy generation opens with "
            f"\"Sure, here is\" for {100 * record['opens_adapter']:.0f}% with the adapter and "
            f"{100 * record['opens_base']:.0f}% without it.",
        ]
    return "\n".join(lines) + "\n"
