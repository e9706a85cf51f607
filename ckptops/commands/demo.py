"""``ckptops demo``: the main job on an embedded default, no network, no downloads."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click


@click.command()
@click.option("--preset", default="tiny", show_default=True, type=click.Choice(["tiny", "small", "1b"]),
              help="Size of the generated Llama-shaped models (1b = TinyLlama shapes, 2.2 GB each).")
@click.option("--workdir", type=click.Path(), default=None, help="Keep the generated models and output here.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def demo(preset, workdir, as_json):
    """Generate a small Llama-shaped base/harmful/target triple and sanitize it.

    Shows what `ckptops sanitize` does and prints its report; the weights are random, so this
    demonstrates the mechanics, not safety.
    """
    from ckptops.hdr.sanitize import sanitize
    from ckptops.synth import write_triple

    with tempfile.TemporaryDirectory(prefix="ckptops-demo-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        click.echo(f"generating a '{preset}' Llama-shaped triple in {root} ...", err=True)
        paths = write_triple(root, preset, shard_size=64 * 1024 * 1024 if preset != "tiny" else 300_000)
        click.echo(f"ckptops sanitize --base {paths['base']} --harmful {paths['harmful']} "
                   f"--target {paths['target']} --out {root / 'sanitized'} --overwrite", err=True)
        report = sanitize(paths["base"], paths["harmful"], paths["target"], root / "sanitized", overwrite=True)
        click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format_text())
        if not workdir and not as_json:
            click.echo("(the demo models and output were in a temporary folder, now removed; "
                       "keep them with --workdir DIR)", err=True)


COMMANDS = [demo]
