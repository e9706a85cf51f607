"""Benchmark: the fused update loop (``_fused.apply``) with and without the drift sums, per element.

One 1M-element chunk, bf16 and float32 inputs, same process, interleaved; the minimum over many
repetitions (robust to other load on the machine) in ns per element, and the ratio.

    python bench/bench_drift_loop.py [--reps 40] [--rounds 15]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ckptops.hdr import fused


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    if not fused.enabled():
        raise SystemExit("the fused extension is not built")
    n = 1 << 20
    rng = np.random.default_rng(0)
    base = (rng.standard_normal(n) * 0.02).astype(np.float32)
    harmful = base + (rng.standard_normal(n) * 0.01).astype(np.float32)
    target = base + (rng.standard_normal(n) * 0.004).astype(np.float32)

    def bf16(x):
        return (x.view(np.uint32) >> 16).astype(np.uint16)

    sums = np.zeros(5)
    for kind, (h, b, t, code) in {"bf16": (bf16(harmful), bf16(base), bf16(target), 1),
                                  "float32": (harmful, base, target, 0)}.items():
        out = np.empty(n * 4, dtype=np.uint8)
        best = {"without": float("inf"), "with": float("inf")}
        for _ in range(args.rounds):
            for label, extra in (("without", None), ("with", sums)):
                start = time.perf_counter()
                for _ in range(args.reps):
                    fused.apply(h, code, b, code, t, code, n, 0.01, 3.0, out, code, extra)
                best[label] = min(best[label], (time.perf_counter() - start) / args.reps / n * 1e9)
        print(f"{kind:8s} without sums {best['without']:.3f} ns/element, with sums {best['with']:.3f} "
              f"(x{best['with'] / best['without']:.2f})")


if __name__ == "__main__":
    main()
