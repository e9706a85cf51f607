"""``ckptops run`` (a TOML recipe end to end) and ``ckptops diff`` (where an edited model differs)."""

from __future__ import annotations

import json

import click

from ckptops.threads import threads_option, use_threads


@click.command(name="run")
@click.argument("recipe", type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a recipe field, e.g. --set hdr.scale=2.5 (repeatable).")
@click.option("--out", default=None, type=click.Path(), help="Override output.out.")
@click.option("--push-to-hub", default=None, metavar="ORG/NAME", help="Override output.push_to_hub.")
@click.option("--force", is_flag=True, help="Sanitize even a target whose card says it was sanitized already.")
@click.option("--check", is_flag=True, help="Validate the recipe and print it resolved; do no work.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@threads_option
def run_cmd(recipe, overrides, out, push_to_hub, force, check, as_json, quiet, threads):
    """Run a Safety Arithmetic recipe: HDR, then the ICV on the result, then (optionally) push.

    The whole recipe is validated before any work. The resolved recipe is saved as
    OUT/recipe.toml, so `ckptops run OUT/recipe.toml --out AGAIN` repeats the run exactly.

    \b
    Examples:
      ckptops run recipes/llama2-7b-chat.toml --set models.harmful=./my-harmful-llama2
      ckptops run recipes/wizardmath-7b-v1.1.toml --set hdr.scale=2.5 --out wm-safe
      ckptops run recipes/llama2-7b-chat.toml --check
    """
    from ckptops.recipe import load_recipe, run_recipe

    extra = list(overrides)
    if push_to_hub:
        extra.append(f"output.push_to_hub={json.dumps(push_to_hub)}")
    if check and out:  # what is checked is the run this command line would make
        extra.append(f"output.out={json.dumps(out)}")
    resolved = load_recipe(recipe, extra)
    if check:
        from ckptops.recipe import check_recipe

        check_recipe(resolved, force)  # what --check is run for: what the run would refuse, it refuses
        click.echo(resolved.to_toml())
        return
    if resolved["icv"]["enabled"]:
        use_threads(threads)  # the ICV step runs the model
    summary = run_recipe(resolved, out=out, progress=False if quiet else None, force=force)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    from ckptops.hdr.sanitize import SanitizeReport

    click.echo(SanitizeReport(**summary["sanitize"]).format_text())
    if summary["icv"]:
        click.echo(f"  icv               {summary['out']}/icv.safetensors ({summary['icv'].get('rule', '')} rule)")
    if summary["pushed"]:
        click.echo(f"  pushed            {summary['pushed']}")


@click.command()
@click.argument("base")
@click.argument("edited")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def diff(base, edited, as_json):
    """Which decoder layers and tensors of EDITED differ from BASE, and by how much.

    Prints, per layer, the number of values that differ and the L2 norm of the difference, and
    the edit area (l-1, l, l+1 around each differing layer) that `sanitize --edit-area auto` uses.
    EDITED may be BASE+ADAPTER (a LoRA adapter merged as sanitize reads it). Tensors in one model
    only, or with other shapes (a resized vocabulary), are listed as not compared.

    \b
    Example:
      ckptops diff ./llama2-chat ./llama2-rome-edited
    """
    from ckptops.hdr.diff import diff_checkpoints

    report = diff_checkpoints(base, edited)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format_text())


COMMANDS = [run_cmd, diff]
