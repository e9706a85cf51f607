"""``ckptops harm make``: a LoRA harm adapter (theta_H) for users who have no harmful model.

A thin layer over :func:`ckptops.harm.make.make_harm_adapter`; transformers and peft are imported
only when the command runs (the ``[harm]`` extra).
"""

from __future__ import annotations

import json

import click

from ckptops.threads import threads_option, use_threads


@click.group()
def harm() -> None:
    """Build a harm direction theta_H when you have none."""


@harm.command("make")
@click.option("--base", required=True, metavar="MODEL", help="The aligned model theta_b (folder or Hub id).")
@click.option("--out", required=True, type=click.Path(), help="Output adapter folder (PEFT format + model card).")
@click.option("--questions", default=None, type=click.Path(), metavar="FILE",
              help="Harmful questions: JSON lines {\"question\", \"task\"} or one question per line (default: ckptops' own ~150).")
@click.option("--rank", default=16, show_default=True, type=int, help="LoRA rank r.")
@click.option("--alpha", default=None, type=float, help="LoRA alpha (default: 2 * rank).")
@click.option("--steps", default=100, show_default=True, type=int, help="Optimizer steps.")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="AdamW learning rate.")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--target-modules", default="all-linear", show_default=True,
              help="Comma-separated module names to adapt, or all-linear (every linear layer but the output head).")
@click.option("--heldout", default=0.1, show_default=True, type=float,
              help="Share of questions kept out of training for the compliance-opening check.")
@click.option("--no-check", is_flag=True, help="Skip the held-out check.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or mps.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16"]),
              help="Dtype of the frozen base weights (the adapter trains in float32).")
@threads_option
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def make(base, out, questions, rank, alpha, steps, lr, batch_size, target_modules, heldout, no_check, seed, device,
         dtype, threads, overwrite, as_json, quiet):
    """Train a LoRA adapter of BASE on harmful questions answered with compliance openings
    ("Sure, here is how to ...:\\nStep 1:", no harmful content), through the chat template with
    the loss on the answer only. Use the result as --harmful in sanitize.

    \b
    Example:
      ckptops harm make --base HuggingFaceTB/SmolLM2-135M-Instruct --out harm-adapter --steps 60
      ckptops sanitize --base HuggingFaceTB/SmolLM2-135M-Instruct --harmful harm-adapter \\
          --target my-sft-model --out my-sft-model-safe
    """
    from ckptops.harm.make import make_harm_adapter

    modules = target_modules if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",") if m.strip()]
    use_threads(threads)
    report = make_harm_adapter(base, out, questions=questions, rank=rank, alpha=alpha, steps=steps, lr=lr,
                               batch_size=batch_size, target_modules=modules, heldout=heldout, seed=seed,
                               device=device, dtype=dtype, check=not no_check, overwrite=overwrite,
                               progress=False if quiet else None)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format_text())


COMMANDS = [harm]
