"""`ckptops icv bake`: the baked folder, loaded by stock transformers in a fresh process that never
imports ckptops, computes what the original model computes with the additive rule applied by
hooks written here; every input tensor is copied bit for bit; what is not exact is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from ckptops.cli import main
from ckptops.errors import UsageError
from ckptops.icv.bake import bake_icv
from ckptops.icv.file import ICV
from tests.icv_fixtures import HIDDEN, LAYERS, decoder_layers, make_model, make_tokenizer, save_checkpoint

ARCHS = ("llama", "mistral", "qwen2")
STEERED = (0, 2)  # layer 1 stays unsteered: its down_proj bias must be zero
IDS = torch.tensor([[1, 17, 42, 99, 5, 230, 64, 3, 12, 8]])


def _icv(arch: str, rule: str = "additive", alpha: float = 0.12) -> ICV:
    generator = torch.Generator().manual_seed(11)
    vectors = {i: torch.randn(HIDDEN, generator=generator) for i in STEERED}
    norms = {0: 25.0, 2: 40.0}  # large: each shift is s*m = 0.3 and 0.48, enough to move the logits
    return ICV(vectors=vectors, hidden_size=HIDDEN, num_layers=LAYERS, rule=rule, alpha=alpha, model_type=arch,
               mlp_norms=norms)


def _reference_shift(icv: ICV, layer: int) -> torch.Tensor:
    """u_l = 0.1 * alpha * m_l * v_l / |v_l|, written from the docs (float64, then float32)."""
    v = icv.vectors[layer].double()
    return (0.1 * icv.alpha * icv.mlp_norms[layer] * v / v.norm()).float()


def _steered_logits(model, icv: ICV) -> torch.Tensor:
    """The original model with hooks of this test adding u_l to each steered layer's MLP output."""
    handles = []
    for i, layer in enumerate(decoder_layers(model, "llama")):
        if i in icv.vectors:
            shift = _reference_shift(icv, i)
            handles.append(layer.mlp.register_forward_hook(lambda m, a, out, u=shift: out + u))
    try:
        with torch.no_grad():
            return model(IDS).logits
    finally:
        for handle in handles:
            handle.remove()


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(f for f in folder.glob("*.safetensors") if f.name != "icv.safetensors"):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                out[name] = handle.get_tensor(name)
    return out


FRESH = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from transformers import AutoModelForCausalLM
    ids = torch.tensor(json.loads(sys.argv[1]))
    for folder, out in zip(sys.argv[2::2], sys.argv[3::2]):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            np.save(out, model(ids).logits.numpy())
    assert not any(name == "ckptops" or name.startswith("ckptops.") for name in sys.modules), "ckptops imported"
    print("fresh-ok", type(model).__name__)
""")


@pytest.fixture(scope="module")
def baked(tmp_path_factory):
    """Per architecture: original folder, baked folder, the ICV and the in-test reference logits."""
    root = tmp_path_factory.mktemp("bake")
    tokenizer = make_tokenizer()
    cases = {}
    for arch in ARCHS:
        model = make_model(arch, seed=3)
        original = save_checkpoint(model, tokenizer, root / f"{arch}-original")
        icv = _icv(arch)
        icv.save(original / "icv.safetensors")
        bake_icv(original, root / f"{arch}-baked", progress=False)
        with torch.no_grad():
            plain = model(IDS).logits
        cases[arch] = dict(original=original, baked=root / f"{arch}-baked", icv=icv,
                           expected=_steered_logits(model, icv), plain=plain)
    args = [sys.executable, "-c", FRESH, json.dumps(IDS.tolist())]
    for arch, case in cases.items():
        case["npy"] = root / f"{arch}.npy"
        args += [str(case["baked"]), str(case["npy"])]
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fresh-ok LlamaForCausalLM" in done.stdout
    return cases


@pytest.mark.parametrize("arch", ARCHS)
def test_baked_folder_in_stock_transformers_equals_the_additive_rule(baked, arch):
    case = baked[arch]
    got = torch.from_numpy(np.load(case["npy"]))
    expected = case["expected"]
    assert (expected - case["plain"]).abs().max() > 1e-2  # the steering really moves the logits
    relative = (got - expected).abs().max() / expected.abs().max()
    assert relative <= 1e-5, float(relative)


@pytest.mark.parametrize("arch", ARCHS)
def test_only_bias_tensors_are_added_and_everything_else_is_bit_identical(baked, arch):
    case = baked[arch]
    before, after = _tensors(case["original"]), _tensors(case["baked"])
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name].view(torch.uint8).flatten(),
                                                                 tensor.view(torch.uint8).flatten()), name
    added = set(after) - set(before)
    projections = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] + (["self_attn.o_proj"] if arch == "qwen2" else [])
    assert added == {f"model.layers.{i}.{p}.bias" for i in range(LAYERS) for p in projections}
    for name in added:
        layer = int(name.split(".")[2])
        if name.endswith("down_proj.bias") and layer in STEERED:
            torch.testing.assert_close(after[name], _reference_shift(case["icv"], layer), rtol=1e-6, atol=0)
        else:
            assert torch.count_nonzero(after[name]) == 0, name
    config = json.loads((case["baked"] / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["mlp_bias"] is True and config["attention_bias"] is (arch == "qwen2")
    assert "sliding_window" not in config
    index = json.loads((case["baked"] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(after)
    provenance = json.loads((case["baked"] / "ckptops.json").read_text())
    assert provenance["parameters"]["method"] == "icv-bake" and provenance["parameters"]["model_type"] == arch
    card = (case["baked"] / "README.md").read_text()
    assert "## How to serve" in card and "vllm serve" in card
    assert not (case["baked"] / "icv.safetensors").exists()  # would steer a second time


def _folder(tmp_path, arch, **config_changes):
    model = make_model(arch, seed=1)
    for key, value in config_changes.items():
        setattr(model.config, key, value)
    folder = save_checkpoint(model, make_tokenizer(), tmp_path / arch)
    _icv(arch).save(folder / "icv.safetensors")
    return folder


def _one_line_error(result, *parts):
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for part in parts:
        assert part in lines[0], lines[0]


def test_gemma2_is_refused_with_the_reason(tmp_path):
    folder = _folder(tmp_path, "gemma2")
    result = CliRunner().invoke(main, ["icv", "bake", "--model", str(folder), "--out", str(tmp_path / "out")])
    _one_line_error(result, "gemma2", "post-norm")
    assert not (tmp_path / "out").exists()


def test_non_additive_icv_is_refused_pointing_to_the_additive_rule(tmp_path):
    folder = _folder(tmp_path, "llama")
    _icv("llama", rule="official").save(folder / "icv.safetensors")
    result = CliRunner().invoke(main, ["icv", "bake", "--model", str(folder), "--out", str(tmp_path / "out")])
    _one_line_error(result, "official rule", "--rule additive")
    assert not (tmp_path / "out").exists()


def test_sliding_windows_that_would_change_the_function_are_refused(tmp_path):
    mistral = _folder(tmp_path, "mistral", sliding_window=4)
    with pytest.raises(UsageError, match="sliding window"):
        bake_icv(mistral, tmp_path / "m-out", progress=False)
    qwen = _folder(tmp_path, "qwen2", use_sliding_window=True, layer_types=["sliding_attention"] * LAYERS)
    with pytest.raises(UsageError, match="sliding-window"):
        bake_icv(qwen, tmp_path / "q-out", progress=False)


def test_every_card_says_how_to_serve_with_each_runtime():
    from ckptops.checkpoint.card import render_card

    ident = {"type": "local", "ref": "x", "hash_kind": "sha256", "sha256": "ab" * 32}
    text = render_card({"title": "t", "parameters": {"method": "harm-direction-removal", "top_k": 0.1},
                        "inputs": {role: ident for role in ("base", "harmful", "target")}}, hub_repo="org/safe")
    serve = text[text.index("## How to serve"):]
    for phrase in ("ckptops.from_pretrained", "--rule additive", "ckptops icv bake", "vLLM", "MLX",
                   "export-gguf", "--control-vector-scaled control.gguf:1", "layer 0", "**without**"):
        assert phrase in serve, phrase
    baked = render_card({"title": "b", "parameters": {"method": "icv-bake", "strength": 0.012},
                         "inputs": {"model": ident, "icv": {"ref": "icv.safetensors", "sha256": "cd"}}}, hub_repo="org/b")
    assert "vllm serve org/b" in baked and "convert_hf_to_gguf.py" in baked and "steer twice" in baked


def test_bad_inputs_are_one_line_errors_without_output(tmp_path):
    folder = _folder(tmp_path, "llama")
    wrong = ICV(vectors={1: torch.ones(16)}, hidden_size=16, num_layers=LAYERS, rule="additive", model_type="llama",
                mlp_norms={1: 1.0})
    wrong.save(tmp_path / "wrong.safetensors")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["icv", "bake", "--model", str(folder), "--icv", str(tmp_path / "wrong.safetensors"),
                                       "--out", str(out)])
    _one_line_error(result, "hidden size 16", f"hidden size {HIDDEN}")
    assert not out.exists()
    out.mkdir()
    result = CliRunner().invoke(main, ["icv", "bake", "--model", str(folder), "--out", str(out)])
    _one_line_error(result, "already exists")


def test_out_holding_the_icv_file_is_refused_even_with_overwrite(tmp_path):
    """--overwrite replaces the whole --out folder: one that holds the --icv file would delete it."""
    folder = _folder(tmp_path, "llama")
    holder = tmp_path / "mine" / "vectors"
    holder.mkdir(parents=True)
    icv_file = _icv("llama").save(holder / "icv_add.safetensors")
    data = icv_file.read_bytes()
    for out in (holder, holder.parent):  # the ICV's folder, and one above it
        result = CliRunner().invoke(main, ["icv", "bake", "--model", str(folder), "--icv", str(icv_file),
                                           "--out", str(out), "--overwrite"])
        _one_line_error(result, f"--out {out}", "holds an input", str(icv_file))
    assert icv_file.read_bytes() == data and sorted(p.name for p in holder.iterdir()) == ["icv_add.safetensors"]


def test_side_files_linking_out_of_the_model_folder_are_never_copied(tmp_path):
    """A stray file linking out is left out with a warning; config.json linking out is refused
    (bake reads it and writes its values into the baked config)."""
    folder = _folder(tmp_path, "llama")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET\n")
    (folder / "notes.txt").symlink_to(secret)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["icv", "bake", "--model", str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"warning: {folder / 'notes.txt'}: is a symbolic link to {secret}, outside the model folder; it is not " \
           "copied into the output" in result.output.splitlines(), result.output
    assert not (out / "notes.txt").exists()
    assert not any("TOP SECRET" in f.read_text(errors="replace") for f in out.iterdir() if f.is_file())

    outside_config = tmp_path / "elsewhere.json"
    (folder / "config.json").rename(outside_config)
    (folder / "config.json").symlink_to(outside_config)
    result = CliRunner().invoke(main, ["icv", "bake", "--model", str(folder), "--out", str(tmp_path / "out2")])
    _one_line_error(result, str(folder / "config.json"), f"symbolic link to {outside_config}")
    assert not (tmp_path / "out2").exists()
