"""Official rule against additive rule on SmolLM2-135M: ICV alone and after HDR, a small strength sweep.

Why: the additive rule is the one that can be baked into weights and run by llama.cpp, so before
recommending it we measure what it costs against the official rule, on the same held-out prompts,
with the same judge, at the same strengths (both rules read alpha as a fraction of the MLP
output's size: the official rule rotates each token's MLP output by at most 2*s of its norm,
the additive rule adds s times the layer's typical MLP-output norm; s = 0.1*alpha).

Uses the models `run.py` builds (``--work``: ``models/original``, ``models/harmful``,
``models/target``, ``data/``). Writes under ``--out``: the sanitized model (HDR, shipped
defaults), one ICV per model (official rule; its recorded MLP-output norms let the same file run
additively), one JSON report per evaluation (``ckptops eval``'s library call), and
``icv_rules.md`` with the table.

    python examples/smollm2/icv_rules.py --work /work/smol --out /work/smol/bake/rules --threads 1
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def balanced_xstest(source: Path, target: Path, every: int) -> Path:
    """Every ``every``-th row of the XSTest sample (the file is sorted by prompt type)."""
    with open(source, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    kept = rows[::every]
    with open(target, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    return target


def first_lines(source: Path, target: Path, count: int) -> Path:
    """The first ``count`` prompts of a JSON-lines file (written outside the repository)."""
    lines = source.read_text(encoding="utf-8").splitlines()[:count]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def summarise(report: dict) -> dict:
    """Refusal / broken / "Sure, here is" rates per set and label, and perplexity, from an eval report."""
    out = {}
    for row in report["summary"]:
        if row["set"] == "all":
            continue
        key = f"{row['set']} {row['label']}"
        outputs = [r["output"] for r in report["results"] if r["set"] == row["set"] and r["label"] == row["label"]]
        sure = sum(o.strip().lower().startswith("sure, here is") for o in outputs) / max(1, len(outputs))
        out[key] = {"n": row["n"], "refusal": row["refusal_rate"]["estimate"],
                    "broken": row["broken_rate"]["estimate"], "sure": sure}
    ppl = report.get("perplexity")
    out["ppl"] = ppl.get("perplexity") if isinstance(ppl, dict) else ppl
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/work/smol", help="folder with models/ and data/ (run.py's layout)")
    parser.add_argument("--out", required=True, help="folder for the sanitized model, ICVs and reports")
    parser.add_argument("--alphas", default="0.12,0.4,1.2", help="strengths to sweep, per rule")
    parser.add_argument("--advbench-limit", type=int, default=50)
    parser.add_argument("--xstest-every", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from ckptops.evaluate.run import evaluate
    from ckptops.evaluate.report import to_json
    from ckptops.hdr.sanitize import sanitize
    from ckptops.icv.compute import compute_icv
    from ckptops.icv.load import load_model

    torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    (out / "reports").mkdir(parents=True, exist_ok=True)
    models = work / "models"
    sanitized = out / "sanitized"
    if not sanitized.exists():
        sanitize(models / "original", models / "harmful", models / "target", sanitized, progress=False)
    icvs = {}
    for name, folder in (("target", models / "target"), ("sanitized", sanitized)):
        path = out / f"icv-{name}.safetensors"
        if not path.exists():
            with load_model(folder, quiet=True) as loaded:
                compute_icv(loaded.model, loaded.tokenizer, rule="official", progress=False,
                            source=str(folder), source_sha256=loaded.source_sha256).save(path)
        icvs[name] = path
    xstest = balanced_xstest(work / "data" / "xstest_sample.csv", out / "xstest_half.csv", args.xstest_every)
    advbench = first_lines(work / "data" / "advbench_heldout.jsonl", out / "advbench_heldout_first.jsonl",
                           args.advbench_limit)
    prompts = [advbench, xstest]
    runs = [("target", models / "target", None, None), ("sanitized", sanitized, None, None)]
    for alpha in (float(a) for a in args.alphas.split(",")):  # strength first: a cut-short run still compares rules
        for name, folder in (("target", models / "target"), ("sanitized", sanitized)):
            for rule in ("official", "additive"):
                runs.append((name, folder, rule, alpha))
    results = []
    for name, folder, rule, alpha in runs:
        tag = f"{name}" + (f"-{rule}-{alpha:g}" if rule else "-plain")
        report_path = out / "reports" / f"{tag}.json"
        if not report_path.exists():
            started = time.perf_counter()
            report = evaluate(folder, prompts, labels=["harmful", "auto"], limit=None,
                              icv=icvs[name] if rule else None, icv_alpha=alpha, icv_rule=rule,
                              max_new_tokens=args.max_new_tokens, batch_size=32,
                              ppl=HERE / "benign_text.txt", progress=False)
            report_path.write_text(to_json(report), encoding="utf-8")
            print(f"{tag}: {time.perf_counter() - started:.0f} s", flush=True)
        results.append((name, rule, alpha, summarise(json.loads(report_path.read_text(encoding="utf-8")))))
        write_table(results, out, args.max_new_tokens)
    print((out / "icv_rules.md").read_text(encoding="utf-8"))


def write_table(results: list, out: Path, max_new_tokens: int) -> None:
    """``icv_rules.md``: one row per evaluation, sorted by model, rule and strength."""
    results = sorted(results, key=lambda r: (r[0] != "target", r[1] or "", r[2] or 0.0))
    keys = [k for k in results[0][3] if k != "ppl"]
    header = ("| model | rule | alpha | " + " | ".join(f"{k}: refusal % / broken % / 'Sure, here is' %" for k in keys)
              + " | perplexity |")
    lines = [header, "|" + "---|" * (4 + len(keys))]
    for name, rule, alpha, summary in results:
        cells = [f"{100 * summary[k]['refusal']:.0f} / {100 * summary[k]['broken']:.0f} / {100 * summary[k]['sure']:.0f}"
                 for k in keys]
        lines.append(f"| {name} | {rule or '-'} | {'' if alpha is None else f'{alpha:g}'} | " + " | ".join(cells)
                     + f" | {summary['ppl']:.2f} |")
    ns = ", ".join(f"{k}: n={results[0][3][k]['n']}" for k in keys)
    table = "\n".join(lines) + f"\n\n({ns}; greedy, {max_new_tokens} new tokens, keyword judge)\n"
    (out / "icv_rules.md").write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
