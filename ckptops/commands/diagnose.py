"""``ckptops diagnose``: will HDR help this target? (reads three models, writes nothing)."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--base", required=True, metavar="MODEL", help="Aligned base model theta_b (folder, .safetensors file or Hub id org/name[@revision]).")
@click.option("--harmful", required=True, metavar="MODEL", help="theta_b fine-tuned on harmful Q&A (theta_H); tau = theta_H - theta_b.")
@click.option("--target", required=True, metavar="MODEL", help="The model you would sanitize.")
@click.option("--top-k", default=0.10, show_default=True, type=float, help="The HDR top-k fraction whose selection M is diagnosed.")
@click.option("--scale", default=3.0, show_default=True, type=float, help="The HDR scale lambda whose effect is predicted.")
@click.option("--scope", default="global", show_default=True, type=click.Choice(["global", "layer", "tensor"]),
              help="Where top-k is taken (as sanitize).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Tensors sanitize would leave unchanged; not counted (repeatable).")
@click.option("--layers", metavar="LIST", help="Only these decoder layers, e.g. 4-6 (as sanitize).")
@click.option("--max-memory", default="1GiB", show_default=True, help="Peak memory budget, e.g. 512MiB, 2GiB.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def diagnose(base, harmful, target, top_k, scale, scope, exclude, layers, max_memory, as_json, quiet):
    """How TARGET moved from BASE, against the harm vector, and what HDR would do to it.

    \b
    d = theta_t - theta_b, tau = theta_H - theta_b, M tau = the top-k selection sanitize makes
    reports ||tau||, ||d||, cos(d, tau), cos(d, M tau), <d, M tau>/||M tau||^2 and, at --scale,
    ||lambda M tau||/||d|| and ||d - lambda M tau||/||d||, overall and per decoder layer,
    then a verdict in plain words. It warns; nothing is written.

    \b
    Example:
      ckptops diagnose --base smollm2 --harmful smollm2-harmful --target smollm2-sft --scale 3
    """
    from ckptops.hdr.diagnose import diagnose as run
    from ckptops.preflight import check_layers_text

    check_layers_text(layers)  # --layers '' is a mistake, not "all layers"
    report = run(base, harmful, target, top_k=top_k, scale=scale, scope=scope, exclude=list(exclude),
                 layers=layers, max_memory=max_memory, progress=None if not quiet else False)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format_text())


COMMANDS = [diagnose]
