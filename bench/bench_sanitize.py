"""Benchmark: `ckptops sanitize --scope global` beside mergekit on the same synthetic triple.

Generates a Llama-shaped bf16 base/harmful/target triple (presets tiny .. 7b, see ckptops.synth),
then runs, each in a fresh process, ckptops and mergekit's closest equivalent (breadcrumbs with
gamma 0 and density 0.1 on the harmful model, weight -3, no normalize/rescale: a top-10% magnitude
mask per *tensor* subtracted three times; mergekit has no global top-k) and prints wall time and
peak RSS of each, and their ratios, measured in the same run. ckptops runs ``--repeat`` times on
its default path (the fused C loops when they are built) and, with ``--torch-path``, as often
again with ``CKPTOPS_NO_FUSED=1`` (what an install without a C compiler gets).

    python bench/bench_sanitize.py --preset 1b                 # needs ~7 GB disk per run
    python bench/bench_sanitize.py --preset 7b --skip-mergekit # peak RSS at 7B vs 1.1B
    python bench/bench_sanitize.py --preset 1b --repeat 5 --torch-path
    python bench/bench_sanitize.py --preset 1b --mergekit bench/_work/mk-venv/bin/mergekit-yaml
    python bench/bench_sanitize.py --preset 1b --repeat 5 --drift-cost --torch-path --skip-mergekit
    python bench/bench_sanitize.py --preset 1b --two-pass      # before/after the one-read pass
    python bench/bench_sanitize.py --preset 1b --cold --skip-mergekit  # inputs evicted from the
                                    # page cache before every run, beside the cat/dd floor

``--cold`` evicts the input files' pages with ``posix_fadvise(DONTNEED)`` before each run (works
without root, unlike ``/proc/sys/vm/drop_caches``), and times the floor: ``cat`` of the three
inputs to /dev/null plus ``dd`` of an output-sized file with ``oflag=direct``, cold as well.
Every ckptops variant also runs once with ``--json``, and the bytes it read (and downloaded) per
input are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (clean pages only; no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(cmd: list[str], env: dict | None = None, stdout: Path | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``cmd``, run alone in a fresh child (its stdout to
    the file ``stdout`` when given)."""
    wrapper = (
        "import resource, subprocess, sys, time, json\n"
        "out = open(sys.argv[1], 'w') if sys.argv[1] else subprocess.DEVNULL\n"
        "t = time.perf_counter()\n"
        "rc = subprocess.call(sys.argv[2:], stdout=out)\n"
        "dt = time.perf_counter() - t\n"
        "print(json.dumps([rc, dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, str(stdout or ""), *cmd], capture_output=True, text=True,
                         env=env)
    rc, seconds, rss = json.loads(out.stdout.strip().splitlines()[-1])
    if rc != 0:
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return seconds, rss


def ensure_triple(preset: str) -> dict[str, Path]:
    root = WORK / f"triple-{preset}"
    marker = root / "done"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        from ckptops.synth import write_triple

        print(f"generating the {preset} triple in {root} ...", file=sys.stderr)
        t = time.perf_counter()
        write_triple(root, preset, shard_size=2 * 10**9)
        marker.write_text("ok")
        print(f"  {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return {r: root / r for r in ("base", "harmful", "target")}


def mergekit_config(paths: dict[str, Path], path: Path) -> None:
    path.write_text(
        "merge_method: breadcrumbs\n"
        f"base_model: {paths['base']}\n"
        "models:\n"
        f"  - model: {paths['target']}\n"
        "    parameters: {weight: 1.0, density: 1.0, gamma: 0.0}\n"
        f"  - model: {paths['harmful']}\n"
        "    parameters: {weight: -3.0, density: 0.1, gamma: 0.0}\n"
        "parameters: {normalize: false, rescale: false}\n"
        "dtype: bfloat16\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1b", choices=["tiny", "small", "1b", "7b"])
    ap.add_argument("--mergekit", default=str(WORK / "mk-venv" / "bin" / "mergekit-yaml"))
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--torch-path", action="store_true", help="also time the torch path (CKPTOPS_NO_FUSED=1)")
    ap.add_argument("--drift-cost", action="store_true",
                    help="also time each path without the drift sums (CKPTOPS_NO_DRIFT_SUMS=1), runs interleaved")
    ap.add_argument("--two-pass", action="store_true", help="also time --two-pass (the engine before the one-read pass)")
    ap.add_argument("--cold", action="store_true", help="evict the inputs from the page cache before every run, "
                    "and time the cat/dd floor")
    args = ap.parse_args()
    from ckptops.hdr import fused

    default_path = "fused C loops" if fused.enabled() else "torch path: the extension is not built"

    paths = ensure_triple(args.preset)
    size = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors"))
    print(f"preset {args.preset}: {size / 1e9:.2f} GB per model (bf16), {os.cpu_count()} cores")
    rows = []
    out = WORK / f"out-ckptops-{args.preset}"
    ckptops = [sys.executable, "-m", "ckptops.cli", "sanitize", "--base", str(paths["base"]),
               "--harmful", str(paths["harmful"]), "--target", str(paths["target"]), "--out", str(out),
               "--overwrite", "--quiet", "--scope", "global"]
    variants = [(f"ckptops sanitize --scope global, one read ({default_path})", None, [])]
    if args.two_pass:
        variants.append((f"ckptops sanitize --scope global --two-pass ({default_path})", None, ["--two-pass"]))
    if args.torch_path:
        variants.append(("ckptops sanitize --scope global, one read (torch path)",
                         {**os.environ, "CKPTOPS_NO_FUSED": "1"}, []))
    if args.drift_cost:
        variants += [(f"{name}, no drift sums", {**(env or os.environ), "CKPTOPS_NO_DRIFT_SUMS": "1"}, extra)
                     for name, env, extra in list(variants)]
    inputs = sorted(f for role in ("base", "harmful", "target") for f in paths[role].glob("*.safetensors"))
    reports = {}
    # interleaved (a, b, a, b ...) so that a change in machine load hits every variant alike
    for i in range(args.repeat + 1):
        for name, env, extra in variants:
            shutil.rmtree(out, ignore_errors=True)  # each run writes a fresh folder, as a user's would
            if args.cold:
                evict(inputs)
            if i == args.repeat:  # one more run for the report (--json): bytes read per input
                measure(ckptops + extra + ["--json"], env, WORK / "report.json")
                reports[name] = json.loads((WORK / "report.json").read_text())
            else:
                rows.append((name, *measure(ckptops + extra, env)))
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    if args.cold:
        floor_file = WORK / "floor.bin"
        floor = (f"cat {' '.join(map(str, inputs))} > /dev/null && dd if=/dev/zero of={floor_file} bs=8M "
                 f"count={-(-out_bytes // (8 << 20))} oflag=direct conv=fsync status=none")
        for _ in range(args.repeat):
            evict(inputs)
            rows.append(("floor: cat the 3 inputs + dd the output (oflag=direct)", *measure(["bash", "-c", floor])))
            floor_file.unlink(missing_ok=True)

    if not args.skip_mergekit:
        if not Path(args.mergekit).exists():
            print(f"mergekit not found at {args.mergekit}; skipping it", file=sys.stderr)
        else:
            config = WORK / "mergekit.yml"
            mergekit_config(paths, config)
            mk_out = WORK / f"out-mergekit-{args.preset}"
            cmd = [args.mergekit, str(config), str(mk_out), "--lazy-unpickle", "--allow-crimes",
                   "--out-shard-size", "5B", "--no-cuda"]
            rows.append(("mergekit breadcrumbs (per-tensor top-k)", *measure(cmd)))
            shutil.rmtree(mk_out, ignore_errors=True)

    print("\n| tool | wall s | peak RSS |\n|---|---:|---:|")
    for name, seconds, rss in rows:
        print(f"| {name} | {seconds:.1f} | {rss / 2**30:.2f} GiB |")
    print()
    for name, (_, report) in zip(reports, reports.items()):
        io = report.get("io", {})
        print(f"{name}: read per input " + ", ".join(
            f"{role} {v['read'] / 1e9:.3f} GB" + (f" ({v['downloaded'] / 1e9:.3f} GB downloaded)" if v.get("downloaded") else "")
            for role, v in io.items()) + f" (each model: {size / 1e9:.3f} GB)")
        if report.get("one_read"):
            o = report["one_read"]
            print(f"  one read: {o['values_corrected']:,} of {o['corrections_recorded']:,} in-band values corrected, "
                  f"correction file {o['correction_file_bytes'] / 1e6:.1f} MB, band missed: {o['band_missed'] or 'none'}")
    names = [name for name, _, _ in variants] + (["floor: cat the 3 inputs + dd the output (oflag=direct)"] if args.cold else [])
    for name in names:
        runs = [r for r in rows if r[0] == name]
        wall = [r[1] for r in runs]
        print(f"{name}: median {statistics.median(wall):.1f} s (min {min(wall):.1f}, max {max(wall):.1f}, "
              f"{len(wall)} runs), peak RSS max {max(r[2] for r in runs) / 2**30:.2f} GiB")
    medians = {name: statistics.median(r[1] for r in rows if r[0] == name) for name in names}
    if args.two_pass:
        print(f"two-pass / one-read wall: x{medians[variants[1][0]] / medians[variants[0][0]]:.2f}")
    if args.drift_cost:
        for name, _, _ in variants:
            if not name.endswith(", no drift sums"):
                print(f"drift sums cost, {name}: median {medians[name]:.2f} s with, "
                      f"{medians[name + ', no drift sums']:.2f} s without "
                      f"(x{medians[name] / medians[name + ', no drift sums']:.3f})")
    if args.cold:
        print(f"one-read / floor wall: x{medians[variants[0][0]] / medians[names[-1]]:.2f}")
    if rows[-1][0].startswith("mergekit"):
        ours = [r for r in rows if r[0] == variants[0][0]]
        wall, rss = statistics.median(r[1] for r in ours), max(r[2] for r in ours)
        print(f"mergekit / ckptops (median ckptops run): wall x{rows[-1][1] / wall:.1f}, peak RSS x{rows[-1][2] / rss:.1f}")


if __name__ == "__main__":
    main()
