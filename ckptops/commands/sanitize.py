"""``ckptops sanitize`` and ``ckptops inspect``."""

from __future__ import annotations

import json

import click

from ckptops.units import format_size


@click.command()
@click.option("--base", required=True, metavar="MODEL", help="Aligned base model theta_b (folder, .safetensors file or Hub id org/name[@revision]).")
@click.option("--harmful", required=True, metavar="MODEL", help="theta_b fine-tuned on harmful Q&A (theta_H); tau = theta_H - theta_b. "
              "A PEFT LoRA adapter folder/repo works too: tau = scaling * B @ A (see 'ckptops harm make').")
@click.option("--target", required=True, metavar="MODEL", help="Model to sanitize: theta_b itself, an SFT or an edited model of the same backbone; "
              "BASE+ADAPTER is a base with a LoRA adapter merged on the fly (an existing path with '+' in its name is one model).")
@click.option("--out", required=True, type=click.Path(), help="Output folder (written to a temporary folder, moved into place when complete).")
@click.option("--top-k", default=0.10, show_default=True, type=float, help="Fraction of |tau| kept, by magnitude (1.0 = dense task vector).")
@click.option("--scale", default=3.0, show_default=True, type=float, help="lambda: theta_t - lambda * pruned tau (official TIES: 3).")
@click.option("--scope", default="global", show_default=True, type=click.Choice(["global", "layer", "tensor"]),
              help="Where top-k is taken: whole model (official), per decoder layer, per tensor.")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Leave matching tensors unchanged and out of the selection (repeatable).")
@click.option("--layers", metavar="LIST", help="Only these decoder layers, e.g. 4-6 (edited models): selection and update.")
@click.option("--edit-area", type=click.Choice(["auto"]), default=None,
              help="Edited models: find the layers where TARGET differs from BASE and use l-1..l+1 around each.")
@click.option("--force", is_flag=True, help="Sanitize even if TARGET's model card says it was sanitized already.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
              help="Output dtype (auto: the target's).")
@click.option("--max-memory", default="1GiB", show_default=True, help="Peak memory budget, e.g. 512MiB, 2GiB.")
@click.option("--shard-size", default=None, help="Re-shard the output, e.g. 5GB (default: the target's sharding).")
@click.option("--hash-inputs", is_flag=True, help="Record a full sha256 of every input file (default: a sampled fingerprint).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (only once the new output is complete).")
@click.option("--low-disk", is_flag=True,
              help="Hub inputs: remove each downloaded shard from the HF cache as soon as no remaining work needs it "
                   "(about one shard per model on disk; every shard downloaded once; global/layer scope samples "
                   "shards not yet downloaded by range requests; with --two-pass, global scope downloads base and harmful 3 times).")
@click.option("--resume", is_flag=True,
              help="Continue a run into the same OUT that was killed (kill -9, power cut) with the same arguments "
                   "(the first run needs no --resume): output shards it finished whose checksum checks out are reused "
                   "and their inputs not read again; the rest of the pass, the exact threshold, the corrections and "
                   "the side files are done again. The output is the same bytes. Without --resume a dead run's "
                   "folder is removed.")
@click.option("--two-pass", is_flag=True,
              help="Global/layer scope: select, then apply (reads base and harmful twice) instead of the one-read pass; "
                   "for comparison, same output.")
@click.option("--push-to-hub", default=None, metavar="ORG/NAME", help="Upload the finished folder to this Hub model repo.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@click.option("--branch", default=None, metavar="NAME", help="With --push-to-hub: push to this branch.")
@click.option("--commit-message", default=None, metavar="TEXT", help="With --push-to-hub: the commit message.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def sanitize(base, harmful, target, out, top_k, scale, scope, exclude, layers, edit_area, force, dtype, max_memory,
             shard_size, hash_inputs, overwrite, low_disk, resume, two_pass, push_to_hub, private, branch, commit_message, as_json, quiet):
    """Harm Direction Removal: subtract the top-k pruned harm vector from TARGET.

    \b
    theta = theta_target - scale * (|tau| >= t) * tau,  tau = theta_harmful - theta_base
    (float32, t = exact top-k threshold, rounded once to the output dtype)

    Streams tensor by tensor in bounded memory; the defaults reproduce the official
    Safety Arithmetic code (top-k 10% over the whole model, scale 3).

    Prints how TARGET had drifted from BASE against tau, and a warning when HDR at this scale is
    likely to damage it (the figures of `ckptops diagnose`, computed in the same pass; also in
    --json, ckptops.json and the model card). It warns; it never refuses.

    MODEL is a local folder or a Hub reference org/name[@revision]: the revision is pinned to a
    commit, every header is read (range requests) before any download, and shards download
    through the Hugging Face cache (HF_HUB_OFFLINE=1 works from the cache).

    \b
    Examples:
      ckptops sanitize --base llama2-chat --harmful llama2-harmful \\
          --target wizardmath --out wizardmath-safe
      ckptops sanitize --base meta-llama/Llama-2-7b-chat-hf@main --harmful me/llama2-harmful \\
          --target WizardLMTeam/WizardMath-7B-V1.1 --out wm-safe --low-disk \\
          --push-to-hub me/wm-safe --private
    """
    from ckptops.hdr.sanitize import sanitize as run
    from ckptops.preflight import check_layers_text

    check_layers_text(layers)  # --layers '' is a mistake, not "all layers"
    report = run(base, harmful, target, out, top_k=top_k, scale=scale, scope=scope, exclude=list(exclude),
                 layers=layers, dtype=dtype, max_memory=max_memory, shard_size=shard_size,
                 overwrite=overwrite, progress=None if not quiet else False, hash_inputs=hash_inputs,
                 low_disk=low_disk, resume=resume, one_read=not two_pass, push_to_hub=push_to_hub, private=private, branch=branch,
                 commit_message=commit_message, edit_area=edit_area, force=force)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format_text())


@click.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--tensors/--no-tensors", default=True, show_default=True, help="List every tensor.")
def inspect(path, as_json, tensors):
    """List a checkpoint's shards and tensors (dtype, shape, bytes), validating every header.

    PATH may be a Hub reference org/name[@revision]: only the index and the headers are read
    (HTTP range requests); no weights are downloaded.

    \b
    Examples:
      ckptops inspect ./my-model
      ckptops inspect meta-llama/Llama-2-7b-chat-hf --no-tensors
    """
    from ckptops.checkpoint.resolve import open_checkpoint

    ckpt = open_checkpoint(path)
    total = sum(i.numel for i in ckpt.tensors.values())
    if as_json:
        click.echo(json.dumps({
            "ref": ckpt.ref,
            "identity": ckpt.identity,
            "shards": {n: s.header.file_size for n, s in ckpt.shards.items()},
            "parameters": total,
            "tensors": {n: {"dtype": i.dtype, "shape": list(i.shape), "shard": i.shard, "bytes": i.nbytes}
                        for n, i in ckpt.tensors.items()} if tensors else None,
        }, indent=2))
        return
    click.echo(f"{ckpt.ref}: {len(ckpt.shards)} shard(s), {len(ckpt.tensors)} tensors, "
               f"{total:,} parameters, {format_size(ckpt.total_bytes)}")
    if ckpt.identity.get("type") == "hub":
        click.echo(f"  commit {ckpt.identity['commit']}")
    for name, shard in ckpt.shards.items():
        click.echo(f"  {name}  {len(shard.header.tensors)} tensors  {format_size(shard.header.file_size)}")
    if tensors:
        width = max(len(n) for n in ckpt.tensors)
        for name, info in ckpt.tensors.items():
            click.echo(f"  {name:<{width}}  {info.dtype:<5} {str(list(info.shape)):<18} {format_size(info.nbytes)}")


COMMANDS = [sanitize, inspect]
