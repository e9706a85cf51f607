#!/usr/bin/env python
"""theta_H from `ckptops harm make` (a LoRA adapter) against run.py's full fine-tune theta_H, each
used to sanitize the same SmolLM2 target, judged on the same held-out prompts.

    python examples/smollm2/run.py --steps 1,2,3 --threads 1     # the models and data first
    python examples/smollm2/lora_harm.py --threads 1               # about 20 minutes on 2 busy cores

Steps (results cached under ``WORK/lora/``; ``--force`` redoes them):

1. ``ckptops harm make --base ORIGINAL`` with ckptops' shipped question file (not the AdvBench
   prompts run.py trained theta_H on: this is what a user without data gets), rank 16 on every
   linear projection, ``--steps`` steps. Its held-out check is printed. A second adapter is made
   the same way from run.py's own theta_H training pairs (its AdvBench prompts and openings), to
   tell "LoRA instead of a full fine-tune" apart from "other questions".
2. ``ckptops sanitize`` of the same target twice with the shipped defaults (global top-k 10%,
   lambda 3): once with ``--harmful ADAPTER``, once with run.py's full fine-tune ``--harmful
   HARMFUL``. HDR only (no ICV), so the two harm directions are compared alone.
3. ``ORIGINAL+ADAPTER`` written as a model (``sanitize --top-k 1 --scale 0`` on a
   BASE+ADAPTER target is exactly the float32 merge rounded once) so that the adapter-steered
   model can be evaluated like run.py's theta_H.
4. ``ckptops eval`` exactly as run.py's step 5 (held-out AdvBench, the XSTest sample,
   perplexity on benign_text.txt), and a table in ``WORK/lora/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as example  # noqa: E402  (run.py: the same helpers, data layout and evaluation)


def harm_make(original: Path, out: Path, *, steps: int, rank: int, lr: float, seed: int, threads: int | None,
              force: bool, questions: Path | None = None) -> Path:
    if example.done(out) and not force:
        example.log(f"harm make: {out} exists")
        return out
    command = example.ckptops("harm", "make", "--base", original, "--out", out, "--rank", str(rank),
                              "--steps", str(steps), "--lr", str(lr), "--seed", str(seed), "--overwrite")
    if threads is not None:
        command += ["--threads", str(threads)]
    if questions is not None:
        command += ["--questions", questions]
    started = time.perf_counter()
    example.run(command)
    example.log(f"harm make: {time.perf_counter() - started:.0f} s")
    example.mark_done(out)
    return out


def sanitize(base: Path, harmful: Path | str, target: Path | str, out: Path, force: bool, *extra: str) -> Path:
    if example.done(out) and not force:
        example.log(f"sanitize: {out} exists")
        return out
    started = time.perf_counter()
    example.run(example.ckptops("sanitize", "--base", base, "--harmful", harmful, "--target", target,
                                "--out", out, "--overwrite", "--quiet", *extra))
    example.log(f"sanitize: {out.name} in {time.perf_counter() - started:.0f} s")
    example.mark_done(out)
    return out


def pruned_norm(original: Path, harmful: Path, threshold: float) -> tuple[float, float]:
    """(||tau||, ||(|tau| >= threshold) * tau||) of a full theta_H or a LoRA adapter folder, in
    float64 from the files (independent of ckptops' engine)."""
    import torch
    from safetensors.torch import load_file

    base = load_file(str(original / "model.safetensors"))
    if (harmful / "adapter_config.json").is_file():
        config = json.loads((harmful / "adapter_config.json").read_text())
        weights = load_file(str(harmful / "adapter_model.safetensors"))
        scaling = config["lora_alpha"] / config["r"]
        tau = {k: weights[k.replace("lora_A", "lora_B")].double() @ a.double() * scaling
               for k, a in weights.items() if ".lora_A." in k}
    else:
        other = load_file(str(harmful / "model.safetensors"))
        tau = {k: other[k].double() - base[k].double() for k in base}
    total = sum(float((v ** 2).sum()) for v in tau.values()) ** 0.5
    kept = sum(float((torch.where(v.abs() >= threshold, v, 0.0) ** 2).sum()) for v in tau.values()) ** 0.5
    return total, kept


def threshold_of(folder: Path) -> float:
    return json.loads((folder / "ckptops.json").read_text())["report"]["thresholds"]["all"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=example.DEFAULT_WORK, help="run.py's work folder")
    parser.add_argument("--steps", type=int, default=60, help="harm make optimizer steps")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work: Path = args.work
    original, harmful, target = (work / "models" / n for n in ("original", "harmful", "target"))
    for model in (original, harmful, target):
        if not example.done(model):
            raise SystemExit(f"{model} is not built: run examples/smollm2/run.py --steps 1,2,3 first")
    files = {"heldout": work / "data" / "advbench_heldout.jsonl", "xstest": work / "data" / "xstest_sample.csv"}
    mine = work / "lora"
    mine.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    adapter = harm_make(original, mine / "harm-adapter", steps=args.steps, rank=args.rank, lr=args.lr,
                        seed=args.seed, threads=args.threads, force=args.force)
    same_data = mine / "advbench-questions.jsonl"  # run.py's theta_H pairs, as a harm make question file
    same_data.write_text("".join(
        json.dumps({"question": r["prompt"],
                    "opening": example.COMPLIANCE_TEMPLATE.format(task=example.task_of(r["prompt"]))}) + "\n"
        for r in example.read_jsonl(work / "data" / "advbench_harmful_ft.jsonl")), encoding="utf-8")
    adapter_same = harm_make(original, mine / "harm-adapter-advbench", steps=args.steps, rank=args.rank, lr=args.lr,
                             seed=args.seed, threads=args.threads, force=args.force, questions=same_data)
    sanitized_lora = sanitize(original, adapter, target, mine / "sanitized-lora", args.force)
    sanitized_same = sanitize(original, adapter_same, target, mine / "sanitized-lora-advbench", args.force)
    sanitized_full = sanitize(original, harmful, target, mine / "sanitized-full", args.force)
    # the same pruned harm vector size as the full theta_H's at lambda 3: lambda = 3 * ||full|| / ||lora||
    full_norm = pruned_norm(original, harmful, threshold_of(sanitized_full))
    norms = {"full": full_norm}
    matched = {}
    for key, folder, made in (("lora", adapter, sanitized_lora), ("lora_advbench", adapter_same, sanitized_same)):
        norms[key] = pruned_norm(original, folder, threshold_of(made))
        matched[key] = round(3.0 * full_norm[1] / norms[key][1], 3)
    sanitized_lora_m = sanitize(original, adapter, target, mine / "sanitized-lora-matched", args.force,
                                "--scale", str(matched["lora"]))
    sanitized_same_m = sanitize(original, adapter_same, target, mine / "sanitized-lora-advbench-matched", args.force,
                                "--scale", str(matched["lora_advbench"]))
    steered = sanitize(original, original, f"{original}+{adapter}", mine / "original-plus-adapter", args.force,
                       "--top-k", "1", "--scale", "0")

    models = {
        "target": (target, None),
        "harmful_full": (harmful, None),
        "harmful_lora": (steered, None),
        "sanitized_full": (sanitized_full, None),
        "sanitized_lora": (sanitized_lora, None),
        "sanitized_lora_advbench": (sanitized_same, None),
        "sanitized_lora_matched": (sanitized_lora_m, None),
        "sanitized_lora_advbench_matched": (sanitized_same_m, None),
    }
    labels = {
        "target": "SFT target (theta_t)",
        "harmful_full": "theta_H: full fine-tune (run.py)",
        "harmful_lora": "theta_H: theta_b + harm make LoRA",
        "sanitized_full": "HDR with the full fine-tune theta_H",
        "sanitized_lora": "HDR with the LoRA theta_H (harm make, shipped questions)",
        "sanitized_lora_advbench": "HDR with a LoRA theta_H on run.py's AdvBench pairs",
        "sanitized_lora_matched": f"HDR with the LoRA theta_H (shipped questions), lambda {matched['lora']} (norm-matched)",
        "sanitized_lora_advbench_matched": f"HDR with the LoRA theta_H (AdvBench pairs), lambda {matched['lora_advbench']} (norm-matched)",
    }
    reports = example.evaluate_all(mine, models, {**files}, max_new_tokens=args.max_new_tokens,
                                   batch_size=args.eval_batch, force=args.force)
    table = example.results_table(reports, labels)
    lines = []
    for label, folder in (("shipped questions", adapter), ("run.py's AdvBench pairs", adapter_same)):
        record = json.loads((folder / "ckptops-harm.json").read_text())
        losses = record["losses"]
        lines.append(f"harm make ({label}): rank {record['parameters']['rank']}, {len(losses)} steps, loss "
                     f"{sum(losses[:5]) / 5:.3f} -> {sum(losses[-5:]) / 5:.3f}; held-out check: "
                     f"{100 * record['opens_adapter']:.0f}% of {record['heldout_questions']} open with \"Sure, here is\" "
                     f"with the adapter, {100 * record['opens_base']:.0f}% without")
    for key, (total, kept) in norms.items():
        lines.append(f"||tau_H|| {key}: {total:.2f}, after the top-10% pruning: {kept:.2f}"
                     + (f" (lambda for the full theta_H's size: {matched[key]})" if key in matched else ""))
    summary = "\n".join(lines)
    (mine / "results.md").write_text(summary + "\n\n" + table + "\n", encoding="utf-8")
    print()
    print(summary)
    print()
    print(table)
    example.log(f"wrote {mine / 'results.md'} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
