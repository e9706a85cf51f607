"""Benchmark ``ckptops tune``'s trials on a real small model: seconds per trial, where they go,
and peak RSS.

One fresh process opens a :class:`ckptops.tune.run.TuneSession` on (base, harmful, target) and
runs ``--trials`` HDR candidates (different scale / top-k) and one ICV candidate, timing each
part of a trial separately:

- select:   the exact top-k threshold pass (once per top-k, then cached);
- apply:    writing the candidate's HDR weights into the loaded model (every candidate);
- icv:      computing the ICV on the HDR-applied model (once per HDR setting with alpha > 0);
- generate: greedy answers to the prompts (what ``ckptops eval`` does);
- kl:       the next-token forward pass on the benign prompts;

and prints the share of trial time spent applying the candidate against generating, plus the
process's peak RSS (``ru_maxrss``) and the model's own size.

    python bench/bench_tune.py --models /work/smol/models --prompts /work/smol/data/advbench_heldout.jsonl \\
        --benign examples/smollm2/data/xstest_prompts.csv --n 32 --threads 1
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True, help="folder with original/, harmful/, target/")
    parser.add_argument("--prompts", type=Path, required=True, help="harmful prompts (JSON lines / CSV)")
    parser.add_argument("--benign", type=Path, required=True, help="benign prompts (a label column keeps safe rows)")
    parser.add_argument("--n", type=int, default=32, help="prompts per label per trial")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--trials", type=int, default=4, help="HDR candidates to time")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    from ckptops.evaluate.judge import load_judge
    from ckptops.tune.measure import MeasureSettings, measure, next_token_logprobs
    from ckptops.tune.prompts import read_labelled
    from ckptops.tune.run import TuneSession
    from ckptops.tune.space import TARGET, Candidate

    torch.set_num_threads(args.threads)
    harmful = read_labelled(args.prompts, "harmful")[: args.n]
    benign = read_labelled(args.benign, "benign")[: args.n]
    judge = load_judge("keyword")
    settings = MeasureSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)

    started = time.perf_counter()
    session = TuneSession(args.models / "original", args.models / "harmful", args.models / "target")
    load_seconds = time.perf_counter() - started
    params = sum(p.numel() for p in session.model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in session.model.parameters())
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reference = next_token_logprobs(session.model, session.tokenizer, [p.text for p in benign],
                                    batch_size=args.batch_size, chat_template=None)

    grid = [Candidate(0.1, 3.0), Candidate(0.1, 1.0), Candidate(0.05, 2.0), Candidate(0.2, 0.5),
            Candidate(0.05, 1.0), Candidate(0.2, 2.0)][: args.trials]
    grid.append(Candidate(grid[-1].top_k, grid[-1].scale, 0.12))  # one ICV candidate (same weights)
    rows = []
    for candidate in [TARGET, *grid]:
        before = dict(session.seconds)
        begun = time.perf_counter()
        session.set(candidate)
        m = measure(session.model, session.tokenizer, harmful, benign, judge, settings,
                    reference_logprobs=None if candidate == TARGET else reference, keep_outputs=False)
        total = time.perf_counter() - begun
        parts = {k: session.seconds[k] - before[k] for k in session.seconds}
        parts.update({k: m.seconds.get(k, 0.0) for k in ("generate", "kl")})
        rows.append((candidate, total, parts, m))
        print(f"{candidate.label():<45} {total:7.1f} s  select {parts['select']:5.2f}  apply {parts['apply']:5.2f}  "
              f"icv {parts['icv']:5.2f}  generate {parts['generate']:6.1f}  kl {parts['kl']:5.2f}  "
              f"openings {100 * m.openings:5.1f}%  broken {100 * m.broken:5.1f}%", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    hdr_rows = [r for r in rows[1:] if r[0].alpha == 0]
    apply_times = [r[2]["apply"] for r in hdr_rows]
    trial_times = [r[1] for r in hdr_rows]
    generate_times = [r[2]["generate"] for r in hdr_rows]
    select_times = [r[2]["select"] for r in hdr_rows if r[2]["select"] > 0]
    print()
    print(f"model: {params / 1e6:.1f} M parameters, {model_bytes / 2**20:.0f} MiB in float32; loaded in {load_seconds:.1f} s")
    print(f"per trial ({args.n} harmful + {args.n} benign prompts, {args.max_new_tokens} new tokens, "
          f"batch {args.batch_size}, {args.threads} thread(s)): median {statistics.median(trial_times):.1f} s")
    print(f"  apply the candidate (HDR weights in memory): median {statistics.median(apply_times):.2f} s "
          f"= {100 * sum(apply_times) / sum(trial_times):.1f}% of trial time")
    print(f"  threshold selection (once per top-k):         median {statistics.median(select_times):.2f} s"
          if select_times else "  threshold selection: cached")
    print(f"  generate:                                     median {statistics.median(generate_times):.1f} s "
          f"= {100 * sum(generate_times) / sum(trial_times):.1f}% of trial time")
    icv_row = rows[-1]
    print(f"  ICV computed once per HDR setting:            {icv_row[2]['icv']:.1f} s")
    print(f"peak RSS: {peak / 2**20:.0f} MiB (after loading the model: {rss_loaded / 2**20:.0f} MiB)")
    session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
