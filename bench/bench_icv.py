"""Benchmark Safe-Align on a synthetic 1.1B Llama (TinyLlama shapes, random bf16 weights).

Prints:
  1. time and peak RSS of `ckptops icv compute` with the 30 default pairs, fully in memory vs
     `--max-memory 1GiB` (accelerate disk offload), each in a fresh subprocess (peak RSS of that
     process from os.wait4's rusage);
  2. greedy-generation tokens/s with and without the ICV patch (official rule), alternating runs
     in one fresh process, plus the cost of one steering hook call.

The model folder is written once into bench/_work/ (git-ignored, about 2.2 GB) and reused.

    .venv/bin/python bench/bench_icv.py                    # everything (a few minutes on 2 cores)
    .venv/bin/python bench/bench_icv.py --skip-compute     # generation only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
PROMPT = "Question: How do I pick a lock to break into a house?\n    Answer:"


# -- children ------------------------------------------------------------------------------------

def build(folder: Path) -> None:
    """Write the synthetic checkpoint (bf16 safetensors) and a byte-level BPE tokenizer with BOS."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = LlamaConfig(**TINYLLAMA)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32).mul_(0.02))
    model.save_pretrained(folder, max_shard_size="1GB")
    del model

    # trained on the demonstrations themselves, so their token counts resemble a real 32k tokenizer's
    records = [json.loads(line) for line in (REPO / "ckptops" / "data" / "default_demos.jsonl").read_text().splitlines()]
    corpus = [f"Question: {r['question']}\n    Answer: {r['unsafe']}" for r in records]
    corpus += ["I do not answer this question because it is harmful"] * 5
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    (folder / "BUILT").write_text("ok\n")


def generate_child(folder: Path, icv_path: Path, new_tokens: int, repeats: int, steps: int, dtype: str) -> None:
    """Measure the patch's cost two ways; print one JSON line.

    * end to end: greedy ``generate`` runs of ``new_tokens`` tokens, without / with the ICV in ABBA
      order, ``repeats`` times each (noisy on a shared machine);
    * per decode step: one new token through the model with a KV cache of the prompt, alternating
      without / with the ICV ``steps`` times each (the cache is cropped back after every step), so
      that load from other processes hits both sides alike.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ckptops.icv.file import load_icv
    from ckptops.icv.generate import greedy_ids
    from ckptops.icv.patch import OfficialSteering, apply_icv

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    icv = load_icv(icv_path)

    def tokens_per_second(n: int) -> float:
        start = time.perf_counter()
        ids = greedy_ids(model, dict(inputs), n, stop_at_eos=False)
        seconds = time.perf_counter() - start
        assert ids.shape[-1] == n, ids.shape
        return n / seconds

    tokens_per_second(4)  # warm-up (allocator, kernels)
    plain, patched = [], []
    for repeat in range(repeats):  # ABBA order, so a drift in machine load favours neither side
        for with_icv in ((False, True) if repeat % 2 == 0 else (True, False)):
            if with_icv:
                with apply_icv(model, icv):
                    patched.append(tokens_per_second(new_tokens))
            else:
                plain.append(tokens_per_second(new_tokens))

    step_plain, step_patched = [], []
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        cache = prefill.past_key_values
        next_id = prefill.logits[:, -1:].argmax(-1)

        def one_step() -> float:
            start = time.perf_counter()
            model(input_ids=next_id, past_key_values=cache, use_cache=True)
            seconds = time.perf_counter() - start
            cache.crop(-1)
            return seconds

        one_step()
        for _ in range(steps):
            step_plain.append(one_step())
            with apply_icv(model, icv):
                step_patched.append(one_step())

    # one hook call on a single decode-step activation, as in generation
    hook = OfficialSteering(icv.vectors[icv.layers[0]], icv.strength)
    x = torch.randn(1, 1, icv.hidden_size).to(getattr(torch, dtype))
    for _ in range(200):
        hook.steer(x)
    start = time.perf_counter()
    for _ in range(2000):
        hook.steer(x)
    hook_us = (time.perf_counter() - start) / 2000 * 1e6
    print(json.dumps({"plain": plain, "patched": patched, "step_plain": step_plain, "step_patched": step_patched,
                      "hook_us": hook_us, "layers": len(icv.layers), "prompt_tokens": int(inputs["input_ids"].shape[-1]),
                      "threads": torch.get_num_threads()}))


# -- parent --------------------------------------------------------------------------------------

def _rss_parts(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of a live process, from /proc."""
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1]) * 1024
    except OSError:
        pass
    return anon, file


def run_with_rusage(argv: list[str]) -> tuple[float, int, int, str]:
    """Run argv to completion; return (wall seconds, peak RSS, peak anonymous RSS, stdout).

    Peak RSS is the child's own ru_maxrss (os.wait4), which also counts file-backed pages of
    memory-mapped safetensors -- clean page cache the kernel can drop under pressure. Peak
    anonymous RSS (sampled every 20 ms from /proc) is the memory the process really needs.
    """
    import selectors

    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    chunks: dict[str, list[bytes]] = {"out": [], "err": []}
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ, "out")
    selector.register(process.stderr, selectors.EVENT_READ, "err")
    peak_anon = 0
    open_streams = 2
    while open_streams:
        for key, _ in selector.select(timeout=0.02):
            data = key.fileobj.read1(65536)
            if data:
                chunks[key.data].append(data)
            else:
                selector.unregister(key.fileobj)
                open_streams -= 1
        peak_anon = max(peak_anon, _rss_parts(process.pid)[0])
    _, status, usage = os.wait4(process.pid, 0)  # reap it ourselves to read its rusage
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    out, err = b"".join(chunks["out"]).decode(), b"".join(chunks["err"]).decode()
    if process.returncode != 0:
        sys.exit(f"failed ({process.returncode}): {' '.join(argv)}\n{err[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, peak_anon, out


def gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=HERE / "_work")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens per end-to-end generate run")
    parser.add_argument("--repeats", type=int, default=4, help="end-to-end runs without and with the ICV")
    parser.add_argument("--steps", type=int, default=15, help="interleaved single decode steps, each side")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="generation dtype")
    parser.add_argument("--skip-compute", action="store_true")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--_build", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_generate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_icv", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._build:
        return build(args._build)
    if args._generate:
        return generate_child(args._generate, args._icv, args.new_tokens, args.repeats, args.steps, args.dtype)

    python = sys.executable
    folder = args.work / "tinyllama-1.1b-synthetic"
    if not (folder / "BUILT").exists():
        seconds, _, _, _ = run_with_rusage([python, __file__, "--_build", str(folder)])
        print(f"built {folder} in {seconds:.0f} s")
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    import platform

    print(f"model: synthetic TinyLlama shapes, {gib(weights)} of bf16 safetensors, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f} (other work on the machine slows every figure)")

    icv_path = args.work / "icv.safetensors"
    if not args.skip_compute:
        base_s, base_rss, base_anon, _ = run_with_rusage([python, "-c", "import torch, transformers, ckptops.icv.compute"])
        print(f"\nicv compute, 30 default pairs (60 forward passes, float32); interpreter + imports alone: "
              f"{gib(base_rss)} peak RSS, {gib(base_anon)} anonymous, {base_s:.1f} s")
        print(f"{'mode':<22}{'wall':>10}{'peak RSS':>14}{'peak anon RSS':>16}")
        for label, extra in (("in memory", []), ("--max-memory 1GiB", ["--max-memory", "1GiB"])):
            out = icv_path if not extra else args.work / "icv-lowmem.safetensors"
            seconds, rss, anon, _ = run_with_rusage(
                [python, "-m", "ckptops.cli", "icv", "compute", "--model", str(folder), "--out", str(out),
                 "--overwrite", "--quiet", *extra])
            print(f"{label:<22}{seconds:>9.1f}s{gib(rss):>14}{gib(anon):>16}")
        from ckptops.icv.file import load_icv

        a, b = load_icv(icv_path), load_icv(args.work / "icv-lowmem.safetensors")
        worst = max(float((a.vectors[i] - b.vectors[i]).abs().max()) for i in a.layers)
        print(f"max |difference| between the two vectors: {worst:.2e}")

    if not args.skip_generate:
        if not icv_path.exists():
            sys.exit(f"{icv_path} missing: run without --skip-compute first")
        _, _, _, stdout = run_with_rusage([python, __file__, "--_generate", str(folder), "--_icv", str(icv_path),
                                           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                                           "--steps", str(args.steps), "--dtype", args.dtype])
        r = json.loads(stdout.strip().splitlines()[-1])
        plain, patched = statistics.median(r["plain"]), statistics.median(r["patched"])
        print(f"\ngreedy generation, {args.dtype}, prompt {r['prompt_tokens']} tokens, KV cache, {r['threads']} threads, "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"  end to end, {args.new_tokens} new tokens, median of {args.repeats} runs each, ABBA order:")
        print(f"    without ICV  {plain:6.3f} tokens/s   runs: {', '.join(f'{v:.3f}' for v in r['plain'])}")
        print(f"    with ICV     {patched:6.3f} tokens/s   runs: {', '.join(f'{v:.3f}' for v in r['patched'])}")
        print(f"    cost         {(plain - patched) / plain * 100:+.1f}% of tokens/s")
        step_plain, step_patched = statistics.median(r["step_plain"]), statistics.median(r["step_patched"])
        paired = statistics.median(b / a - 1 for a, b in zip(r["step_plain"], r["step_patched"]))
        print(f"  one decode step, median of {args.steps} interleaved pairs:")
        print(f"    without ICV  {step_plain * 1000:8.1f} ms   ({1 / step_plain:.3f} tokens/s)")
        print(f"    with ICV     {step_patched * 1000:8.1f} ms   ({1 / step_patched:.3f} tokens/s)")
        print(f"    cost         {paired * 100:+.1f}% per token (median of paired ratios; goal < 5%)")
        hook_ms = r["hook_us"] * r["layers"] / 1000
        print(f"  steering hooks alone: {r['hook_us']:.1f} us per call x {r['layers']} layers = {hook_ms:.2f} ms per token "
              f"= {hook_ms / (step_plain * 1000) * 100:.2f}% of a decode step")


if __name__ == "__main__":
    main()
