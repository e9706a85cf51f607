"""``ckptops push``: publish an output folder to a Hugging Face Hub model repo."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("repo")
@click.option("--private", is_flag=True, help="Create the repo private (refuses to push to an existing public repo).")
@click.option("--branch", default=None, metavar="NAME", help="Push to this branch (created from main if missing).")
@click.option("--commit-message", default=None, metavar="TEXT", help="Commit message (default names the folder and ckptops).")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded; no network, no token needed.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def push(folder, repo, private, branch, commit_message, dry_run, as_json):
    """Upload FOLDER (e.g. the --out of sanitize) to the Hub model repo REPO (org/name).

    \b
    The repo is created if needed; large files go through the Hub's large-file storage and an
    interrupted push resumes when run again. Weight files on the branch that FOLDER does not
    hold are deleted in the same upload. A ckptops output gets its README.md regenerated from
    ckptops.json (base_model, parameters, every input's repo and commit). The token comes from
    `hf auth login` or HF_TOKEN and is never printed.

    \b
    Examples:
      ckptops push ./wm-safe me/wm-safe --private --dry-run
      ckptops push ./wm-safe me/wm-safe --private
    """
    from ckptops.hub.push import plan_push
    from ckptops.hub.push import push as run

    if dry_run:
        plan = plan_push(folder, repo, private=private, branch=branch, commit_message=commit_message)
        click.echo(json.dumps(plan.to_dict(), indent=2) if as_json else plan.format_text())
        return
    result = run(folder, repo, private=private, branch=branch, commit_message=commit_message)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.format_text())


COMMANDS = [push]
