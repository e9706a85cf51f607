"""``ckptops tune``: search HDR scale / top-k and ICV alpha against behaviour (a thin click layer
over :func:`ckptops.tune.run.tune`)."""

from __future__ import annotations

import click

from ckptops.threads import threads_option


@click.command("tune")
@click.option("--base", required=True, metavar="B", help="Aligned base model theta_b (folder or Hub ref).")
@click.option("--harmful", required=True, metavar="H", help="Harmful fine-tune theta_H of the base.")
@click.option("--target", required=True, metavar="T", help="The model to make safe again, theta_t.")
@click.option("--harmful-prompts", required=True, metavar="FILE",
              help="Prompts a safe model refuses (JSON lines / CSV; a label column keeps only harmful/unsafe rows).")
@click.option("--benign-prompts", required=True, metavar="FILE",
              help="Prompts a safe model answers (a label column keeps only benign/safe rows, e.g. XSTest).")
@click.option("--holdout", default=None, type=float,
              help="Fraction of each prompt file held out (seeded split) for the final report [default: 0.5; "
                   "not with --holdout-harmful/--holdout-benign].")
@click.option("--holdout-harmful", default=None, metavar="FILE", help="Separate held-out harmful prompts (with --holdout-benign).")
@click.option("--holdout-benign", default=None, metavar="FILE", help="Separate held-out benign prompts (with --holdout-harmful).")
@click.option("--scales", default="0.5,1,2,3,4", show_default=True, help="HDR scales (lambda) to try.")
@click.option("--top-ks", default="0.05,0.1,0.2", show_default=True, help="HDR top-k fractions to try.")
@click.option("--icv-alphas", default="0", show_default=True, help="ICV alphas to try (0 = no ICV), e.g. 0,0.12,0.24.")
@click.option("--icv-rule", default="official", show_default=True, type=click.Choice(["official", "paper", "additive"]),
              help="How the ICV is applied.")
@click.option("--icv-demos", default=None, metavar="FILE", help="ICV demonstration pairs (default: the shipped set).")
@click.option("--trials", default=None, type=int, metavar="N",
              help="Run N Optuna (TPE) trials over these values instead of the whole grid (needs ckptops[tune]).")
@click.option("--max-broken-increase", default=0.02, show_default=True, type=float,
              help="Bound: broken answers at most the target's rate plus this.")
@click.option("--max-kl", default=0.1, show_default=True, type=float,
              help="Bound: KL(target || candidate) of the first answer token on benign prompts, nats.")
@click.option("--max-ppl-increase", default=None, type=float,
              help="Bound (with --ppl): perplexity at most the target's x (1 + this), e.g. 0.03.")
@click.option("--ppl", default=None, metavar="FILE", help="Also measure perplexity on this benign text file.")
@click.option("--max-new-tokens", default=48, show_default=True, type=int, help="Tokens generated per prompt (greedy).")
@click.option("--batch-size", default=16, show_default=True, type=int, help="Prompts per forward pass.")
@click.option("--limit", default=None, type=int, help="At most N prompts per part and label (a seeded sample).")
@click.option("--chat-template/--no-chat-template", default=None,
              help="Wrap prompts in the tokenizer's chat template [default: when it has one].")
@click.option("--scope", default="global", show_default=True, type=click.Choice(["global", "layer", "tensor"]),
              help="Top-k selection scope (as for sanitize).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Tensors left unchanged (as for sanitize; repeatable).")
@click.option("--judge", default="keyword", show_default=True, metavar="NAME",
              help="keyword, package.module:function, or a 'ckptops.judges' entry point (as for eval).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the prompt split and of Optuna.")
@click.option("--out", required=True, metavar="DIR", help="Report folder (a rerun continues from its trials.jsonl).")
@click.option("--write-best", default=None, metavar="DIR", help="Also write the chosen model (sanitize + ICV) here.")
@click.option("--measure-base", is_flag=True,
              help="Also measure the base model on the held-out prompts: what fully undoing the fine-tune gives, "
                   "the yardstick for the bounds (loads it beside the target: twice the model's memory).")
@threads_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or status lines.")
def tune_cmd(base, harmful, target, harmful_prompts, benign_prompts, holdout, holdout_harmful, holdout_benign, scales,
             top_ks, icv_alphas, icv_rule, icv_demos, trials, max_broken_increase, max_kl, max_ppl_increase, ppl,
             max_new_tokens, batch_size, limit, chat_template, scope, exclude, judge, seed, out, write_best, measure_base,
             threads, quiet) -> None:
    """Search the HDR scale and top-k (and the ICV strength) against measured behaviour.

    Every candidate is applied to the target in memory (no checkpoint per trial) and judged
    like `ckptops eval`: on the harmful prompts compliance openings ("Sure, here is"),
    refusals and broken answers; on the benign prompts over-refusal, broken answers and the KL
    divergence of the first answer token against the target; perplexity with --ppl. The choice
    rule: fewest compliance openings, then most refusals, among candidates whose broken rate
    stays within the target's + --max-broken-increase and whose KL stays within --max-kl. The
    chosen candidate, the target and the shipped defaults are then measured on held-out prompts
    (with --measure-base the base model too, as the yardstick).

    OUT gets pareto.md/json, heldout.md, report.json, recipe.toml (for `ckptops run`) and
    trials.jsonl (a rerun with the same arguments continues from it).

    \b
    Example:
      ckptops tune --base orig/ --harmful harmful/ --target sft/ \\
          --harmful-prompts advbench.jsonl --benign-prompts xstest_prompts.csv \\
          --scales 0.5,1,2,3 --top-ks 0.05,0.1 --icv-alphas 0,0.12 --ppl text.txt \\
          --threads 1 --out tune-report/ --write-best tuned/
    """
    from ckptops.threads import use_threads
    from ckptops.tune.run import tune

    progress = not quiet

    def log(message: str) -> None:
        if progress:
            click.echo(message, err=True)

    use_threads(threads)
    result = tune(
        base, harmful, target, harmful_prompts, benign_prompts, out, holdout=holdout,
        holdout_harmful=holdout_harmful, holdout_benign=holdout_benign, scales=scales, top_ks=top_ks,
        icv_alphas=icv_alphas, icv_rule=icv_rule, icv_demos=icv_demos, trials=trials,
        max_broken_increase=max_broken_increase, max_kl=max_kl, max_ppl_increase=max_ppl_increase, ppl=ppl,
        max_new_tokens=max_new_tokens, batch_size=batch_size, chat_template=chat_template, limit=limit, seed=seed,
        scope=scope, exclude=list(exclude), judge=judge, write_best=write_best, progress=progress, log=log,
        measure_base=measure_base,
    )
    click.echo(result.summary())


COMMANDS = [tune_cmd]
