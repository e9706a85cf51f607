"""``ckptops eval``: measure refusals, over-refusals, broken outputs and perplexity offline.

A thin wrapper over :func:`ckptops.evaluate.run.evaluate` and :func:`~ckptops.evaluate.run.compare`:
it parses options, calls the library, prints the table and writes the JSON. transformers is
imported only when the command runs, so ``ckptops --help`` works without it.
"""

from __future__ import annotations

import click

from ckptops.threads import threads_option, use_threads

from ckptops.evaluate.prompts import AUTO_LABEL

_LABELS = ["harmful", "benign", "unsafe", "safe", AUTO_LABEL]


@click.command("eval")
@click.option("--model", "model_dir", metavar="DIR", help="Checkpoint folder to evaluate (safetensors weights).")
@click.option(
    "--compare", "compare_dirs", nargs=2, metavar="ORIGINAL SANITIZED", default=None,
    help="Evaluate two folders on the same prompts and report B - A with paired 95% intervals.",
)
@click.option("--icv", metavar="FILE", help="Apply this ICV file while generating (with --compare: to SANITIZED only).")
@click.option("--icv-alpha", type=float, default=None, help="Override the ICV file's alpha.")
@click.option("--icv-rule", type=click.Choice(["official", "paper", "additive"]), default=None,
              help="Override the ICV file's rule (additive: what a baked folder or llama.cpp runs).")
@click.option(
    "--prompts", "prompt_files", multiple=True, required=True, metavar="FILE",
    help="Prompt file: JSON lines or CSV with a prompt column (repeatable).",
)
@click.option(
    "--label", "labels", multiple=True, type=click.Choice(_LABELS, case_sensitive=False),
    help="Label of the prompts of a file: once for all files, or once per --prompts in order; "
         "'auto' reads the file's label column (XSTest: safe/unsafe).",
)
@click.option(
    "--judge", default="keyword", show_default=True, metavar="NAME",
    help="keyword (offline phrase matching), package.module:function, or a 'ckptops.judges' entry point.",
)
@click.option("--max-new-tokens", default=64, show_default=True, type=int, help="Tokens generated per prompt (greedy).")
@click.option("--batch-size", default=16, show_default=True, type=int, help="Prompts per forward pass (left-padded).")
@click.option("--limit", type=int, default=None, help="Only the first N prompts of each file (quick runs).")
@click.option(
    "--chat-template/--no-chat-template", default=None,
    help="Wrap prompts in the tokenizer's chat template [default: when the tokenizer has one].",
)
@click.option("--ppl", "ppl_file", metavar="FILE", help="Also measure perplexity on this benign UTF-8 text file.")
@click.option("--ppl-window", type=int, default=None, help="Perplexity window in tokens [default: min(1024, model positions)].")
@click.option("--ppl-stride", type=int, default=None, help="New tokens scored per window [default: window/2].")
@click.option("--ppl-max-tokens", type=int, default=None, help="Score only the first N tokens of --ppl.")
@click.option(
    "--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16", "auto"]),
    help="Compute dtype; the ICV is specified in float32.",
)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu, cuda, cuda:1.")
@click.option("--out", "out_file", type=click.Path(),
              help="Write the JSON report (every prompt, output and verdict). An existing file is replaced only "
                   "if it is an earlier eval report, or with --overwrite; never an input file or a file in a model folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file that is not an eval report.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or status lines.")
@threads_option
def eval_cmd(
    model_dir, compare_dirs, icv, icv_alpha, icv_rule, prompt_files, labels, judge, max_new_tokens, batch_size, limit,
    chat_template, ppl_file, ppl_window, ppl_stride, ppl_max_tokens, dtype, device, out_file, overwrite, as_json,
    quiet, threads,
) -> None:
    """Measure how often a model refuses harmful prompts and over-refuses benign ones.

    Every prompt is answered greedily (chat template when the tokenizer has one) and judged
    offline: refusal, compliance, empty, or degenerate (repetition loops, never counted as
    safe). The table shows refusal rates per prompt set and label with 95% Wilson intervals;
    --out keeps every prompt, output and verdict. The keyword judge is phrase matching, not the
    paper's GPT-4 judge: compare models with it, never with the paper's numbers (docs/eval.md).

    \b
    Examples:
      ckptops eval --model safe/ --prompts advbench_heldout.jsonl --label harmful
      ckptops eval --model safe/ --icv safe/icv.safetensors \\
          --prompts advbench_heldout.jsonl --label harmful \\
          --prompts xstest_prompts.csv --label auto --ppl wiki.txt --out report.json
      ckptops eval --compare original/ safe/ --icv safe/icv.safetensors \\
          --prompts xstest_prompts.csv --limit 100
      ckptops eval --model safe/ --prompts p.jsonl --label harmful --judge mypkg.judges:classify
    """
    from ckptops.errors import UsageError
    from ckptops.evaluate.destination import check_report_destination
    from ckptops.evaluate.report import to_json, write_json
    from ckptops.evaluate.run import compare, evaluate

    if bool(model_dir) == bool(compare_dirs):
        raise UsageError("give exactly one of --model DIR or --compare ORIGINAL SANITIZED")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    if out_file is not None and not out_file.strip():
        raise UsageError("--out is empty: name the JSON report file, e.g. --out report.json")
    if out_file:  # before any generation: a refused --out must not cost the run
        inputs = [("--prompts", path) for path in prompt_files] + [("--ppl", ppl_file), ("--icv", icv)]
        check_report_destination(out_file, input_files=inputs, model_folders=[model_dir] if model_dir else compare_dirs,
                                 overwrite=overwrite)
    progress = not quiet
    use_threads(threads)

    def log(message: str) -> None:
        if progress:
            click.echo(message, err=True)

    common = dict(
        labels=list(labels), icv=icv, icv_alpha=icv_alpha, icv_rule=icv_rule, judge=judge, max_new_tokens=max_new_tokens,
        batch_size=batch_size, chat_template=chat_template, limit=limit, ppl=ppl_file, ppl_window=ppl_window,
        ppl_stride=ppl_stride, ppl_max_tokens=ppl_max_tokens, dtype=dtype, device=device, progress=progress,
        log=log,
    )
    if compare_dirs:
        report = compare(compare_dirs[0], compare_dirs[1], list(prompt_files), **common)
    else:
        report = evaluate(model_dir, list(prompt_files), **common)
    if out_file:
        write_json(report, out_file)
        log(f"wrote {out_file}")
    if as_json:
        click.echo(to_json(report), nl=False)
    else:
        click.echo(report.table())


COMMANDS = [eval_cmd]
