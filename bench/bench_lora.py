"""Benchmark: `sanitize --harmful ADAPTER` (a rank-r LoRA on every projection) against the same
run with a dense theta_H, on the synthetic Llama-shaped triple of bench_sanitize.py.

The adapter is written here without peft, in PEFT's format (``adapter_config.json`` +
``adapter_model.safetensors``, float32 A and B, ``lora_alpha = 2r``) for the q/k/v/o/gate/up/down
projections of every layer. Each run is a fresh process; wall time and peak RSS are measured the
same way as bench_sanitize.py, runs alternate between the two inputs, and the ratios come from the
medians of one invocation (after one unmeasured warm-up run of each case). With ``--other-tree DIR`` the dense run is repeated with another
checkout's code (e.g. main before the adapter hook) to show the ordinary path did not slow down.

    python bench/bench_lora.py --preset 1b --repeat 3
    python bench/bench_lora.py --preset 1b --repeat 3 --other-tree /work/main
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_sanitize import WORK, ensure_triple  # noqa: E402


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (bytes) and CPU seconds (user + system) of ``cmd`` in a fresh child.
    CPU seconds are the work done, which other jobs on a shared machine do not inflate much."""
    import subprocess

    wrapper = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter()\n"
        "rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
        "dt = time.perf_counter() - t\n"
        "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(json.dumps([rc, dt, u.ru_maxrss * 1024, u.ru_utime + u.ru_stime]))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env)
    rc, seconds, rss, cpu = json.loads(out.stdout.strip().splitlines()[-1])
    if rc != 0:
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return seconds, rss, cpu

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def ensure_adapter(preset: str, base: Path, rank: int) -> Path:
    """A random rank-``rank`` LoRA adapter over every projection of ``base``."""
    import torch
    from safetensors.torch import save_file

    from ckptops.checkpoint.resolve import open_checkpoint

    folder = WORK / f"adapter-{preset}-r{rank}"
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = open_checkpoint(base)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, info in checkpoint.tensors.items():
        if not name.endswith(".weight") or not any(f".{p}." in name for p in PROJECTIONS):
            continue
        module = name[: -len(".weight")]
        out_rows, in_cols = info.shape
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_cols, generator=g) / in_cols ** 0.5
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_rows, rank, generator=g) * 1e-3
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": [p.split(".")[1] for p in PROJECTIONS],
              "fan_in_fan_out": False, "bias": "none", "use_rslora": False, "use_dora": False,
              "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (folder / "done").write_text("ok")
    return folder


def matmul_seconds(adapter: Path) -> float:
    """Seconds to form every scaling * B @ A once in float32 on one thread, with the engine's own
    product routine (the fused extension's loop, or numpy's matmul without it): the work the
    adapter path adds (the one-read pass forms each product once, plus the 1/64 sample)."""
    import time

    import numpy as np

    from ckptops.checkpoint.lora import _product_rows, read_adapter

    modules = read_adapter(adapter).modules
    factors = [m.factors() + (m.post_scale,) for m in modules.values()]
    out = np.zeros(max(left.shape[0] * right.shape[1] for left, right, _ in factors), dtype=np.float32)
    started = time.perf_counter()
    for left, right, post_scale in factors:
        _product_rows(left, right, 0, left.shape[0], out[: left.shape[0] * right.shape[1]], post_scale)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1b", choices=["tiny", "small", "1b", "7b"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--other-tree", type=Path, default=None, help="also run the dense case with this checkout's code")
    args = ap.parse_args()

    paths = ensure_triple(args.preset)
    adapter = ensure_adapter(args.preset, paths["base"], args.rank)
    out = WORK / "out-lora"
    here = str(HERE.parent)

    def command(harmful: Path, tree: str) -> list[str]:
        # the tree's ckptops first on sys.path (python -m would put the working directory first)
        start = f"import sys; sys.path.insert(0, {tree!r}); from ckptops.cli import console; sys.argv[0] = 'ckptops'; console()"
        return [sys.executable, "-c", start, "sanitize", "--base", str(paths["base"]), "--harmful",
                str(harmful), "--target", str(paths["target"]), "--out", str(out), "--overwrite", "--quiet"]

    def env(tree: str) -> dict:
        return dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")

    cases = [("dense theta_H", paths["harmful"], here), (f"LoRA rank {args.rank} adapter", adapter, here)]
    if args.other_tree is not None:
        cases.append((f"dense theta_H, code of {args.other_tree}", paths["harmful"], str(args.other_tree)))
    results: dict[str, list[tuple[float, int, float]]] = {name: [] for name, _, _ in cases}
    for name, harmful, tree in cases:  # warm the page cache and the interpreter's files: not counted
        measure(command(harmful, tree), env(tree))
    for i in range(args.repeat):
        for name, harmful, tree in cases:
            seconds, rss, cpu = measure(command(harmful, tree), env(tree))
            results[name].append((seconds, rss, cpu))
            print(f"run {i + 1}: {name}: {seconds:.1f} s, CPU {cpu:.1f} s, peak RSS {rss / 2**30:.2f} GiB",
                  file=sys.stderr)
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    print(f"\npreset {args.preset}, adapter rank {args.rank} on every projection ({adapter_bytes / 2**20:.0f} MiB float32), "
          f"{args.repeat} runs each, medians:\n")
    print("| theta_H | wall s (median) | CPU s (median) | peak RSS (max) |\n|---|---:|---:|---:|")
    summary = {}
    for name, runs in results.items():
        wall, rss, cpu = statistics.median(r[0] for r in runs), max(r[1] for r in runs), statistics.median(r[2] for r in runs)
        summary[name] = (wall, rss, cpu)
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {rss / 2**30:.2f} GiB |")
    dense, lora = summary["dense theta_H"], summary[f"LoRA rank {args.rank} adapter"]
    products = matmul_seconds(adapter)
    print(f"\nLoRA / dense: wall x{lora[0] / dense[0]:.2f} ({lora[0] - dense[0]:+.1f} s), "
          f"CPU x{lora[2] / dense[2]:.2f} ({lora[2] - dense[2]:+.1f} s), "
          f"peak RSS x{lora[1] / dense[1]:.2f} ({(lora[1] - dense[1]) / 2**20:+.0f} MiB)")
    print(f"forming every scaling * B @ A once, 1 thread, the engine's product loop: {products:.1f} s "
          f"(the one-read pass forms each once, on {os.cpu_count()} workers' threads)")
    print(f"LoRA wall - dense wall = {lora[0] - dense[0]:+.1f} s against the products' {products:.1f} s: "
          + ("within" if lora[0] - dense[0] <= products else "over") + " the matmul it adds")
    if args.other_tree is not None:
        other = summary[f"dense theta_H, code of {args.other_tree}"]
        print(f"dense, this code / {args.other_tree}: wall x{dense[0] / other[0]:.2f}, CPU x{dense[2] / other[2]:.2f}, "
              f"peak RSS x{dense[1] / other[1]:.2f}")


if __name__ == "__main__":
    main()
