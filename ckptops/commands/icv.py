"""``ckptops icv compute|inspect|export-gguf`` and ``ckptops generate``.

Thin wrappers over :mod:`ckptops.icv`: parse options, call the library, print. transformers and
friends are imported inside the commands, so ``ckptops --help`` works without the ``[icv]`` extra.
"""

from __future__ import annotations

import json
import sys
import time

import click

from ckptops.threads import threads_option, use_threads

_RULES = ["official", "paper", "additive"]


def _progress(quiet: bool) -> bool | None:
    return False if quiet else None


def _quiet_libraries(quiet: bool) -> bool:
    """transformers' own loading bars and notices: only on a terminal, and never with --quiet."""
    return quiet or not sys.stderr.isatty()


@click.group("icv")
def icv_group() -> None:
    """Safe-Align: compute, inspect and export safety in-context vectors (ICV).

    \b
    compute      demonstrations -> icv.safetensors (official Safety Arithmetic recipe)
    inspect      print an ICV file's metadata and per-layer norms
    bake         write a checkpoint whose weights carry an additive-rule ICV (any runtime)
    export-gguf  write a llama.cpp control vector (the additive rule) and print the flags

    Put icv.safetensors in a checkpoint folder and `ckptops generate` or
    `ckptops.from_pretrained(folder)` apply it at load time. See docs/icv.md.
    """


@icv_group.command("compute")
@click.option("--model", "model_ref", required=True, metavar="MODEL",
              help="Checkpoint folder (safetensors) or Hub id, ideally after `ckptops sanitize`.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="ICV file to write, e.g. icv.safetensors.")
@click.option("--demos", type=click.Path(dir_okay=False), default=None,
              help="JSON lines {question, unsafe[, safe]} (default: the ~30 shipped pairs).")
@click.option("--positions", type=click.Choice(["last4", "last"]), default="last4", show_default=True,
              help="Pool the mean of the last 4 tokens (official) or the last token (paper).")
@click.option("--method", type=click.Choice(["pc1+mean", "pc1"]), default="pc1+mean", show_default=True,
              help="Vector = PC1 + mean of the differences (official) or PC1 alone (paper).")
@click.option("--layers", metavar="LIST", default=None,
              help="Keep only these decoder layers, e.g. 4-6 (an edited model's edit area). Default: all.")
@click.option("--rule", type=click.Choice(_RULES), default="official", show_default=True,
              help="How the file says to apply it: official (MLP output, gated, s=0.1*alpha), paper (h + alpha*v) "
                   "or additive (MLP output + s*m_l*v/|v|, s=0.1*alpha, m_l the layer's typical MLP-output norm; "
                   "bakeable, and what llama.cpp runs).")
@click.option("--alpha", type=float, default=None, help="Strength recorded in the file (default 0.12).")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Cap resident weights, e.g. 4GiB; the rest is offloaded to disk (slower, low RAM).")
@click.option("--offload-folder", type=click.Path(file_okay=False), default=None,
              help="Where accelerate may write offloaded weights (default: a temporary folder).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@threads_option
def compute(model_ref, out, demos, positions, method, layers, rule, alpha, max_memory, offload_folder, overwrite, quiet,
            threads):
    """Compute the safety ICV of MODEL and write it to --out.

    Runs every demonstration pair (unsafe and safe answer to a harmful question) through the
    model in float32, one sequence per forward pass, reads each decoder layer's residual
    output, fits a 1-component PCA to the differences and stores the safe-ward vector.

    \b
    Examples:
      ckptops icv compute --model llama2-safe --out llama2-safe/icv.safetensors
      ckptops icv compute --model big-model --out icv.safetensors --max-memory 4GiB
      ckptops icv compute --model edited --out icv.safetensors --layers 4-6 --demos my_pairs.jsonl
      ckptops icv compute --model llama2-safe --out icv.safetensors --rule additive
    """
    from ckptops.hdr.layers import parse_layers
    from ckptops.icv.compute import compute_icv
    from ckptops.icv.demos import check_demo_lengths, load_demos
    from ckptops.icv.destination import check_icv_destination
    from ckptops.icv.file import check_alpha
    from ckptops.icv.load import load_model
    from ckptops.preflight import check_layers_fit, check_layers_text, config_layers, config_window

    target = check_icv_destination(out, model=model_ref, demos=demos, overwrite=overwrite)

    check_layers_text(layers)
    chosen = parse_layers(layers)
    check_layers_fit(chosen, config_layers(model_ref), str(model_ref))
    if alpha is not None:
        check_alpha(alpha)
    pairs = load_demos(demos)  # validate before the (slow) model load
    use_threads(threads)
    started = time.perf_counter()
    window = config_window(model_ref)  # (compute_icv checks again on the loaded model, e.g. for a Hub id)
    with load_model(model_ref, max_memory=max_memory, offload_folder=offload_folder, quiet=_quiet_libraries(quiet),
                    before_weights=lambda tokenizer: check_demo_lengths(pairs, tokenizer, window)) as loaded:
        icv = compute_icv(loaded.model, loaded.tokenizer, pairs, positions=positions, method=method,
                          layers=None if chosen is None else sorted(chosen), rule=rule, alpha=alpha,
                          progress=_progress(quiet), source=loaded.source, source_sha256=loaded.source_sha256)
    from ckptops.icv.file import check_strength

    check_strength(icv, str(target))  # never write an ICV whose strength turns logits into NaN
    icv.save(target, overwrite=True)
    seconds = time.perf_counter() - started
    click.echo(
        f"wrote {target}: {len(icv.layers)}/{icv.num_layers} layers, hidden size {icv.hidden_size}, "
        f"{icv.rule} rule, alpha {icv.alpha:g} (strength {icv.strength:g}), {icv.num_demos} demonstration pairs, "
        f"{seconds:.1f} s"
    )


@icv_group.command("inspect")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (metadata and per-layer norms).")
def inspect_icv(path, as_json):
    """Print an ICV file's metadata and the norm of each layer's vector.

    \b
    Example:
      ckptops icv inspect llama2-safe/icv.safetensors
    """
    from ckptops.hdr.layers import format_layers
    from ckptops.icv.file import get_rule, load_icv

    icv = load_icv(path)
    norms = {i: float(icv.vectors[i].norm()) for i in icv.layers}
    if as_json:
        click.echo(json.dumps({"path": str(path), "metadata": icv.metadata(),
                               "layer_norms": {str(i): n for i, n in norms.items()}}, indent=2))
        return
    meta = icv.metadata()
    click.echo(f"{path}")
    click.echo(f"  format          {meta['format']} v{meta['format_version']} ({meta.get('created_by', '?')})")
    click.echo(f"  rule            {icv.rule}: {get_rule(icv.rule).summary}")
    click.echo(f"  site            {icv.site}")
    click.echo(f"  alpha           {icv.alpha:g} x scale factor {icv.scale_factor:g} = strength {icv.strength:g}")
    click.echo(f"  sign            {meta['sign_convention']}")
    click.echo(f"  method          {icv.method}, positions {icv.positions}")
    click.echo(f"  demonstrations  {icv.num_demos} pairs, sha256 {icv.demos_sha256 or '-'}")
    click.echo(f"  model           {icv.model_type or '?'}, hidden size {icv.hidden_size}, {icv.num_layers} layers")
    click.echo(f"  source          {icv.source or '-'}" + (f" (sha256 {icv.source_sha256})" if icv.source_sha256 else ""))
    click.echo(f"  layers          {format_layers(icv.layers)} ({len(icv.layers)} of {icv.num_layers})")
    for key in sorted(set(meta) - {"format", "format_version", "created_by", "rule", "site", "alpha", "scale_factor",
                                   "strength", "sign_convention", "method", "positions", "num_demos", "demos_sha256",
                                   "model_type", "hidden_size", "num_layers", "source", "source_sha256",
                                   "mlp_output_norms"}):
        click.echo(f"  {key:<15} {meta[key]}")
    if icv.mlp_norms and all(i in icv.mlp_norms for i in icv.layers):
        click.echo("  layer  |v|         m_l (MLP norm)  |u_l| additive")
        for i, n in norms.items():
            additive = icv.strength * icv.mlp_norms[i] if icv.rule == "additive" else 0.1 * icv.alpha * icv.mlp_norms[i]
            click.echo(f"  {i:>5}  {n:<10.6g}  {icv.mlp_norms[i]:<14.6g}  {additive:.6g}")
        return
    click.echo("  layer  |v|")
    for i, n in norms.items():
        click.echo(f"  {i:>5}  {n:.6g}")


@icv_group.command("export-gguf")
@click.argument("icv_path", metavar="ICV", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--model-hint", default=None,
              help="controlvector.model_hint (default: the ICV's model type; another type is refused).")
@click.option("--alpha", type=float, default=None, help="Strength of the exported vector (default: the file's alpha).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def export_gguf_command(icv_path, out, model_hint, alpha, overwrite):
    """Write ICV as a llama.cpp control vector (GGUF) and print the llama.cpp flags to use it.

    The file holds the additive rule's absolute vector u_N = s*m_N*v_N/|v_N| as direction.N,
    which llama.cpp adds to the output of 0-based decoder layer N: at scale 1 llama.cpp computes
    what `--rule additive` computes in ckptops. llama.cpp cannot steer layer 0, so layer 0 is
    left out (with a warning). An official- or paper-rule file is exported under the additive
    rule at the same alpha.

    \b
    Example:
      ckptops icv export-gguf icv.safetensors safety.gguf
      llama-server -m model.gguf --control-vector-scaled safety.gguf:1 --control-vector-layer-range 1 29
    """
    from ckptops.icv.gguf_export import export_gguf

    result = export_gguf(icv_path, out, model_hint=model_hint, alpha=alpha, overwrite=overwrite)
    start, end = result.layer_range
    click.echo(f"wrote {result.path}: {len(result.layers)} direction tensors, layers {start}-{end}, additive rule, "
               f"alpha {result.alpha:g} (strength {result.strength:g}), model hint {result.model_hint!r}")
    if result.source_rule != "additive":
        click.echo(f"note: the file's rule is {result.source_rule}; llama.cpp can only add, so this is the additive "
                   "rule at the same alpha -- preview it with `ckptops generate --rule additive`")
    commands = result.commands()
    click.echo("run it with llama.cpp (scale 1 = exactly the additive rule; :0.5 halves it):")
    click.echo(f"  {commands['llama-server']}")
    click.echo(f"  {commands['llama-cli']}")
    if ":" in str(result.path) or "," in str(result.path):
        click.echo("warning: the path holds ':' or ',', which llama.cpp's FNAME:SCALE parser splits on; "
                   "move the file to a plain path", err=True)


@icv_group.command("bake")
@click.option("--model", "model_ref", required=True, metavar="MODEL", help="Checkpoint folder (safetensors).")
@click.option("--icv", "icv_path", type=click.Path(dir_okay=False), default=None,
              help="Additive-rule ICV file (default: MODEL/icv.safetensors).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--alpha", type=float, default=None, help="Override the file's alpha.")
@click.option("--title", default=None, help="Title of the model card (default: the folder name).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def bake_command(model_ref, icv_path, out, alpha, title, overwrite, quiet):
    """Write MODEL with an additive-rule ICV baked into its weights, for any runtime.

    Each steered layer gets mlp.down_proj.bias = u_l (the additive rule's vector); gate/up and
    unsteered layers get zero biases, config.json gets mlp_bias: true. Every other tensor is
    copied byte for byte. Exact for Llama, Mistral and Qwen2 (the last two relabelled as Llama);
    other architectures and non-additive ICV files are refused with the reason.

    \b
    Example:
      ckptops icv compute --model llama2-safe --out icv.safetensors --rule additive
      ckptops icv bake --model llama2-safe --icv icv.safetensors --out llama2-safe-baked
      vllm serve llama2-safe-baked
    """
    from ckptops.icv.bake import bake_icv

    report = bake_icv(model_ref, out, icv_path, alpha=alpha, overwrite=overwrite, title=title,
                      progress=_progress(quiet))
    from ckptops.hdr.layers import format_layers

    relabel = f", relabelled {report.model_type} -> llama" if report.model_type != report.baked_as else ""
    click.echo(f"wrote {report.out}: additive ICV on layers {format_layers(report.layers)} "
               f"(alpha {report.alpha:g}, strength {report.strength:g}) as {report.bias_tensors} bias tensors"
               f"{relabel}, {report.seconds:.1f} s")


@click.command("generate")
@click.option("--model", "model_ref", required=True, metavar="MODEL", help="Checkpoint folder or Hub id.")
@click.option("--icv", "icv_path", type=click.Path(dir_okay=False), default=None,
              help="ICV file to apply (default: MODEL/icv.safetensors when present).")
@click.option("--no-icv", is_flag=True, help="Do not apply any ICV, even MODEL/icv.safetensors.")
@click.option("--alpha", type=float, default=None, help="Override the file's alpha.")
@click.option("--rule", type=click.Choice(_RULES), default=None, help="Override the file's rule.")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text (repeatable).")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option("--chat/--raw", default=False, show_default=True,
              help="Wrap the prompt in the tokenizer's chat template (--chat) or send it as is.")
@click.option("--compare", is_flag=True, help="Also generate without the ICV and print both.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Model dtype (auto: the checkpoint's).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or loading messages.")
@threads_option
def generate(model_ref, icv_path, no_icv, alpha, rule, prompts, max_new_tokens, chat, compare, dtype, quiet, threads):
    """Greedy-generate from MODEL, steered by an ICV -- a quick way to try one.

    \b
    Examples:
      ckptops generate --model llama2-safe --prompt "How do I pick a lock?"
      ckptops generate --model llama2 --icv icv.safetensors --alpha 0.12 --compare --chat \\
          --prompt "How do I pick a lock?"
    """
    from pathlib import Path

    from ckptops.errors import UsageError
    from ckptops.icv.generate import generate_text
    from ckptops.icv.load import load_model
    from ckptops.icv.patch import ICV_FILENAME, apply_icv

    if no_icv and icv_path:
        raise UsageError("--icv and --no-icv contradict each other")
    chosen = None if no_icv else (Path(icv_path) if icv_path else None)
    if chosen is None and not no_icv and Path(model_ref, ICV_FILENAME).is_file():
        chosen = Path(model_ref, ICV_FILENAME)
    if chosen is None and (alpha is not None or rule is not None or compare):
        raise UsageError(f"--alpha/--rule/--compare need an ICV (--icv FILE or {ICV_FILENAME} in the model folder)")
    if chosen is not None and not chosen.is_file():
        from ckptops.icv.file import missing_icv

        raise missing_icv(chosen, UsageError)
    check_before_loading(model_ref, prompts, chosen, alpha, rule)
    use_threads(threads)
    with load_model(model_ref, dtype=dtype, quiet=_quiet_libraries(quiet),
                    hash_weights=False) as loaded:
        model, tokenizer = loaded.model, loaded.tokenizer
        for prompt in prompts:
            if compare:
                plain = generate_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, chat=chat)
            if chosen is not None:
                with apply_icv(model, chosen, alpha=alpha, rule=rule) as handle:
                    text = generate_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, chat=chat)
                label = f"with ICV ({handle.rule}, alpha {handle.alpha:g})"
            else:
                text = generate_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, chat=chat)
                label = "without ICV"
            if len(prompts) > 1 or compare:
                click.echo(f"### {prompt}")
            if compare:
                click.echo("--- without ICV")
                click.echo(plain)
                click.echo(f"--- {label}")
            elif not quiet:
                click.echo(f"[{label}]", err=True)
            click.echo(text)
    sys.stdout.flush()


def check_before_loading(model_ref, prompts, icv_path, alpha, rule) -> None:
    """Everything ``generate`` can check without the model: prompt text, the ICV file and the
    effective strength (alpha overrides included), so that a bad option fails in a second, not
    after the model has loaded."""
    from ckptops.errors import UsageError
    from ckptops.icv.file import check_alpha, check_strength, load_icv
    from ckptops.safeio import check_text

    for number, prompt in enumerate(prompts, start=1):
        check_text(prompt, f"--prompt {number}", UsageError)
        if len(prompt) > 100_000:
            raise UsageError(f"--prompt {number} is {len(prompt):,} characters; keep prompts under 100,000")
    if alpha is not None:
        check_alpha(alpha)
    if icv_path is not None:
        icv = load_icv(icv_path)
        if alpha is not None or rule is not None:
            icv = icv.with_application(alpha=alpha, rule=rule)
        check_strength(icv, str(icv_path))


COMMANDS = [icv_group, generate]
