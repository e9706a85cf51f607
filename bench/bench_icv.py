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


def generate_child(folder: Path, icv_path: Path, new_tokens: int, repeats: int, dtype: str) -> None:
    """Alternate unpatched / patched greedy runs; print one JSON line of results."""
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

    def timed() -> float:
        start = time.perf_counter()
        ids = greedy_ids(model, dict(inputs), new_tokens, stop_at_eos=False)
        seconds = time.perf_counter() - start
        assert ids.shape[-1] == new_tokens, ids.shape
        return new_tokens / seconds

    timed()  # warm-up (allocator, kernels)
    plain, patched = [], []
    for _ in range(repeats):
        plain.append(timed())
        with apply_icv(model, icv):
            patched.append(timed())

    # one hook call on a single decode-step activation, as in generation
    hook = OfficialSteering(icv.vectors[icv.layers[0]], icv.strength)
    x = torch.randn(1, 1, icv.hidden_size).to(getattr(torch, dtype))
    for _ in range(200):
        hook.steer(x)
    start = time.perf_counter()
    for _ in range(2000):
        hook.steer(x)
    hook_us = (time.perf_counter() - start) / 2000 * 1e6
    print(json.dumps({"plain": plain, "patched": patched, "hook_us": hook_us, "layers": len(icv.layers),
                      "prompt_tokens": int(inputs["input_ids"].shape[-1]), "threads": torch.get_num_threads()}))


# -- parent --------------------------------------------------------------------------------------

def run_with_rusage(argv: list[str]) -> tuple[float, int, str, str]:
    """Like subprocess.run, but reaps the child with os.wait4 to read its own peak RSS."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    # drain pipes without letting Popen reap the child
    out_chunks, err_chunks = [], []
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ, out_chunks)
    selector.register(process.stderr, selectors.EVENT_READ, err_chunks)
    open_streams = 2
    while open_streams:
        for key, _ in selector.select():
            data = key.fileobj.read1(65536)
            if not data:
                selector.unregister(key.fileobj)
                open_streams -= 1
            else:
                key.data.append(data)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    out, err = b"".join(out_chunks).decode(), b"".join(err_chunks).decode()
    if process.returncode != 0:
        sys.exit(f"failed ({process.returncode}): {' '.join(argv)}\n{err[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, out, err


def gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=HERE / "_work")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
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
        return generate_child(args._generate, args._icv, args.new_tokens, args.repeats, args.dtype)

    python = sys.executable
    folder = args.work / "tinyllama-1.1b-synthetic"
    if not (folder / "BUILT").exists():
        seconds, rss, _, _ = run_with_rusage([python, __file__, "--_build", str(folder)])
        print(f"built {folder} in {seconds:.0f} s")
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    import platform

    print(f"model: synthetic TinyLlama shapes, {gib(weights)} of bf16 safetensors, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")

    icv_path = args.work / "icv.safetensors"
    if not args.skip_compute:
        base_s, base_rss, _, _ = run_with_rusage([python, "-c", "import torch, transformers, ckptops.icv.compute"])
        print(f"\nicv compute, 30 default pairs (60 forward passes, float32); baseline interpreter + imports: "
              f"{gib(base_rss)} RSS, {base_s:.1f} s")
        print(f"{'mode':<22}{'wall':>10}{'peak RSS':>14}")
        for label, extra in (("in memory", []), ("--max-memory 1GiB", ["--max-memory", "1GiB"])):
            out = icv_path if not extra else args.work / "icv-lowmem.safetensors"
            seconds, rss, stdout, _ = run_with_rusage(
                [python, "-m", "ckptops.cli", "icv", "compute", "--model", str(folder), "--out", str(out),
                 "--overwrite", "--quiet", *extra])
            print(f"{label:<22}{seconds:>9.1f}s{gib(rss):>14}")
        from ckptops.icv.file import load_icv

        a, b = load_icv(icv_path), load_icv(args.work / "icv-lowmem.safetensors")
        worst = max(float((a.vectors[i] - b.vectors[i]).abs().max()) for i in a.layers)
        print(f"max |difference| between the two vectors: {worst:.2e}")

    if not args.skip_generate:
        if not icv_path.exists():
            sys.exit(f"{icv_path} missing: run without --skip-compute first")
        _, rss, stdout, _ = run_with_rusage([python, __file__, "--_generate", str(folder), "--_icv", str(icv_path),
                                             "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                                             "--dtype", args.dtype])
        result = json.loads(stdout.strip().splitlines()[-1])
        plain, patched = statistics.median(result["plain"]), statistics.median(result["patched"])
        cost = (plain - patched) / plain * 100
        print(f"\ngreedy generation, {args.dtype}, prompt {result['prompt_tokens']} tokens + {args.new_tokens} new, "
              f"KV cache, {result['threads']} threads, median of {args.repeats} alternating runs")
        print(f"  without ICV  {plain:6.2f} tokens/s   runs: {', '.join(f'{v:.2f}' for v in result['plain'])}")
        print(f"  with ICV     {patched:6.2f} tokens/s   runs: {', '.join(f'{v:.2f}' for v in result['patched'])}")
        print(f"  patch cost   {cost:+.1f}% of tokens/s (goal < 5%)")
        print(f"  one steering hook call ({args.dtype}, 1 token): {result['hook_us']:.1f} us x {result['layers']} layers "
              f"= {result['hook_us'] * result['layers'] / 1000:.2f} ms per token")


if __name__ == "__main__":
    main()
