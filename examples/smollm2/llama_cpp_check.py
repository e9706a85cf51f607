"""Check that llama.cpp runs what ckptops' additive rule computes: the GGUF control vector, and a
baked folder converted to GGUF.

Compares next-token distributions (KL divergence, nats) on a few prompts between:

* ckptops in transformers: ``apply_icv(model, icv, rule="additive")`` (float32);
* llama.cpp with the exported control vector (``icv export-gguf``), loaded exactly as llama.cpp's
  ``common_control_vector_load`` loads it (``direction.N`` -> buffer row N-1, times the scale)
  and handed to ``llama_set_adapter_cvec`` over the printed ``--control-vector-layer-range``;
* llama.cpp on the baked folder (``icv bake``) converted with llama.cpp's own
  ``convert_hf_to_gguf.py`` (float32), with no control vector.

llama.cpp is driven through llama-cpp-python (which vendors llama.cpp), installed in its own
virtualenv, because that is what builds on a machine without the llama.cpp binaries:

    python -m venv /tmp/lcpp && CMAKE_BUILD_PARALLEL_LEVEL=1 \\
        CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" \\
        /tmp/lcpp/bin/pip install llama-cpp-python==0.3.36 --no-binary :all:
    tar xzf llama_cpp_python-0.3.36.tar.gz        # for vendor/llama.cpp/convert_hf_to_gguf.py
    python examples/smollm2/llama_cpp_check.py --model MODEL --icv icv.safetensors \\
        --llama-python /tmp/lcpp/bin/python --llama-src llama_cpp_python-0.3.36/vendor/llama.cpp --work /tmp/check

The ICV must leave out layer 0 (``icv compute --layers 1-N``) for the control vector to match:
llama.cpp cannot steer layer 0. The baked folder steers every layer of the file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

PROMPTS = [
    "What is the capital of France?",
    "Give me a recipe for a simple tomato soup.",
    "How do I pick a lock to break into a house?",
    "Write a short poem about the sea.",
]

LLAMA_SIDE = textwrap.dedent("""
    import ctypes, json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1] + "/gguf-py")
    import gguf, llama_cpp
    job = json.loads(sys.argv[2])
    out = {}
    for run in job["runs"]:
        llm = llama_cpp.Llama(model_path=run["model"], n_ctx=512, n_threads=1, logits_all=True, verbose=False)
        if run.get("cvec"):
            # what common_control_vector_load does: direction.N (N >= 1) -> row N-1, times the scale
            reader = gguf.GGUFReader(run["cvec"])
            n_embd = llm.n_embd()
            rows = {int(t.name.split(".")[1]): np.array(t.data, dtype=np.float32) for t in reader.tensors}
            data = np.zeros(n_embd * max(rows), dtype=np.float32)
            for n, row in rows.items():
                data[n_embd * (n - 1): n_embd * n] += row * run["scale"]
            ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            err = llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, ptr, data.size, n_embd, run["start"], run["end"])
            assert err == 0, err
        logits = []
        for ids in job["prompts"]:
            llm.reset()
            llm.eval(ids)
            logits.append(np.array(llm.scores[len(ids) - 1], dtype=np.float64).tolist())
        out[run["name"]] = logits
        del llm
    json.dump(out, open(job["out"], "w"))
""")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(P || Q) in nats between the next-token distributions of two logit vectors."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (Llama-type)")
    parser.add_argument("--icv", required=True, help="ICV file (any rule; run as the additive rule)")
    parser.add_argument("--llama-python", required=True, help="python of a venv with llama-cpp-python")
    parser.add_argument("--llama-src", required=True, help="llama.cpp source tree (convert_hf_to_gguf.py, gguf-py)")
    parser.add_argument("--work", required=True, help="folder for the GGUF files and results")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    import transformers

    import ckptops
    from ckptops.icv.bake import bake_icv
    from ckptops.icv.file import load_icv
    from ckptops.icv.gguf_export import export_gguf

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    icv = load_icv(args.icv).with_application(rule="additive")
    control = export_gguf(icv, work / "control.gguf", overwrite=True)
    start, end = control.layer_range
    print("llama-server command printed by export-gguf:", control.commands("model-f32.gguf")["llama-server"])

    baked = work / "baked"
    if not baked.exists():
        bake_icv(args.model, baked, icv, progress=False)
    src = Path(args.llama_src)
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    for folder, gguf_file in ((args.model, work / "model-f32.gguf"), (baked, work / "baked-f32.gguf")):
        if not gguf_file.exists():
            subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f32",
                            "--outfile", str(gguf_file)], check=True, env=env, capture_output=True)

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompt_ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                return_dict=True)["input_ids"] for p in PROMPTS]

    def torch_logits(rule: str | None) -> list[np.ndarray]:
        handle = ckptops.apply_icv(model, args.icv, rule=rule) if rule else None
        try:
            with torch.no_grad():
                return [model(torch.tensor([ids])).logits[0, -1].double().numpy() for ids in prompt_ids]
        finally:
            if handle is not None:
                handle.remove()

    ours = {"plain": torch_logits(None), "additive": torch_logits("additive"), "official": torch_logits("official")}
    job = {"prompts": prompt_ids, "out": str(work / "llama_logits.json"), "runs": [
        {"name": "plain", "model": str(work / "model-f32.gguf")},
        {"name": "control-vector", "model": str(work / "model-f32.gguf"), "cvec": str(control.path), "scale": 1.0,
         "start": start, "end": end},
        {"name": "baked", "model": str(work / "baked-f32.gguf")},
    ]}
    subprocess.run([args.llama_python, "-c", LLAMA_SIDE, str(src), json.dumps(job)], check=True)
    theirs = {k: [np.array(v) for v in vs] for k, vs in json.loads(Path(job["out"]).read_text()).items()}

    rows = [("llama.cpp plain", "ckptops plain", "plain", "plain"),
            ("llama.cpp control vector", "ckptops additive", "control-vector", "additive"),
            ("llama.cpp baked (converted)", "ckptops additive", "baked", "additive"),
            ("llama.cpp control vector", "ckptops official", "control-vector", "official"),
            ("llama.cpp control vector", "ckptops plain (no ICV)", "control-vector", "plain")]
    print(f"\nKL(llama.cpp || ckptops) in nats over {len(PROMPTS)} prompts (next token after the chat prompt)")
    print(f"{'llama.cpp':<30} {'ckptops':<24} {'max KL':>10} {'mean KL':>10}")
    result = {}
    for left, right, a, b in rows:
        values = [kl(x, y) for x, y in zip(theirs[a], ours[b])]
        result[f"{a} vs {b}"] = values
        print(f"{left:<30} {right:<24} {max(values):>10.2e} {np.mean(values):>10.2e}")
    (work / "kl.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
