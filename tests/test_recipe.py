"""Recipes: validation, end-to-end runs on tiny models, reproducibility, edited models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ckptops.cli import main
from ckptops.recipe import load_recipe
from hdr_reference import bits_equal, load_folder, reference_hdr

transformers = pytest.importorskip("transformers")

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.toml"))


def _tiny_llama_triple(root: Path, layers: int = 8, edit_layer: int | None = None) -> dict[str, Path]:
    """base / harmful / target saved by transformers itself, with a word-level tokenizer."""
    from icv_fixtures import VOCAB_SIZE, make_tokenizer

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB_SIZE,
                                      max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    tokenizer = make_tokenizer()
    paths = {}
    g = torch.Generator().manual_seed(1)
    for role, delta in (("base", 0.0), ("harmful", 0.01), ("target", 0.004)):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
        state = {}
        for name, value in base.state_dict().items():
            noise = delta * torch.randn(value.shape, generator=g)
            if role == "target" and edit_layer is not None:
                noise = noise * 0 if f"layers.{edit_layer}." not in name else 0.01 * torch.randn(value.shape, generator=g)
            state[name] = (value.float() + noise).to(torch.bfloat16)
        model.load_state_dict(state)
        folder = root / role
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        paths[role] = folder
    return paths


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_llama_triple(tmp_path_factory.mktemp("tiny"))


def _overrides(paths: dict[str, Path], out: Path) -> list[str]:
    args = []
    for role in ("base", "harmful", "target"):
        args += ["--set", f"models.{role}={json.dumps(str(paths[role]))}"]
    return args + ["--set", "harm.make=false", "--out", str(out), "-q"]


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_shipped_recipe_validates(recipe):
    resolved = load_recipe(recipe)
    assert 0 < resolved["hdr"]["top_k"] <= 1 and resolved["icv"]["enabled"]
    # theta_H is the user's own, built by harm make, or (RESTA route) the public pretrained model
    assert "harmful" in recipe.read_text().lower() and ("YOUR-ORG" in resolved["models"]["harmful"]
                                                        or resolved["harm"]["make"] or "RESTA" in recipe.read_text())


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_shipped_recipe_runs_end_to_end_and_repeats(recipe, tiny, tmp_path):
    from ckptops.icv.patch import from_pretrained

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(recipe), *_overrides(tiny, out)])
    assert result.exit_code == 0, result.output
    assert (out / "icv.safetensors").exists() and (out / "recipe.toml").exists()
    card = (out / "README.md").read_text()
    assert "icv.safetensors" in card and "safety-arithmetic" in card

    plain = transformers.AutoModelForCausalLM.from_pretrained(out)
    steered = from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    assert not torch.equal(plain(ids).logits, steered(ids).logits)  # the ICV is applied

    again = tmp_path / "again"
    result = CliRunner().invoke(main, ["run", str(out / "recipe.toml"), "--out", str(again), "-q"])
    assert result.exit_code == 0, result.output
    for shard in out.glob("model*.safetensors"):
        assert shard.read_bytes() == (again / shard.name).read_bytes()
    first, second = load_file(str(out / "icv.safetensors")), load_file(str(again / "icv.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("poisoned", ["base", "edited"])
def test_diff_names_the_file_holding_nan(tmp_path, poisoned):
    """A NaN makes the chunk's squared difference NaN whichever side holds it: the error names
    that side's checkpoint and the tensor, in one line."""
    from safetensors.torch import load_file, save_file

    paths = _tiny_llama_triple(tmp_path / "m", layers=2)
    folder = paths["base"] if poisoned == "base" else paths["target"]
    shard = folder / "model.safetensors"
    state = load_file(str(shard))
    name = "model.layers.1.mlp.up_proj.weight"
    state[name][3, 5] = float("nan")
    save_file(state, str(shard), metadata={"format": "pt"})
    result = CliRunner().invoke(main, ["diff", str(paths["base"]), str(paths["target"])])
    err = result.stderr.strip()
    assert result.exit_code != 0 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {folder}: ") and name in err, err


def _sanitize_edit_area_auto(paths: dict[str, Path], out: Path) -> tuple[dict, dict]:
    """sanitize --edit-area auto through the CLI: the output's tensors, and the in-memory
    reference over layers 2-4 (the area an edit in layer 3 implies)."""
    result = CliRunner().invoke(main, ["sanitize", "--base", str(paths["base"]), "--harmful", str(paths["harmful"]),
                                       "--target", str(paths["target"]), "--out", str(out), "--edit-area", "auto", "-q"])
    assert result.exit_code == 0, result.output
    states = {r: load_folder(p) for r, p in paths.items()}
    expected, _ = reference_hdr(states["base"], states["harmful"], states["target"], layers={2, 3, 4})
    return load_folder(out), expected


def test_edit_area_with_a_resized_vocabulary_and_an_extra_tensor(tmp_path):
    """A target with 8 added vocabulary rows and a tensor the base lacks (plain sanitize copies
    those): diff lists them as not compared instead of refusing, finds the edited layer from the
    tensors both hold, and sanitize --edit-area auto equals the in-memory reference."""
    from safetensors.torch import load_file, save_file

    paths = _tiny_llama_triple(tmp_path / "m", layers=6, edit_layer=3)
    shard = paths["target"] / "model.safetensors"
    state = load_file(str(shard))
    g = torch.Generator().manual_seed(5)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = torch.cat([state[name], torch.randn(8, state[name].shape[1], generator=g).to(state[name].dtype)])
    state["score.weight"] = torch.randn(2, 32, generator=g).to(torch.bfloat16)
    save_file(state, str(shard), metadata={"format": "pt"})
    config = json.loads((paths["target"] / "config.json").read_text())
    config["vocab_size"] += 8
    (paths["target"] / "config.json").write_text(json.dumps(config))

    result = CliRunner().invoke(main, ["diff", str(paths["base"]), str(paths["target"]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["differing_layers"] == [3] and report["edit_area"] == "2-4"
    assert set(report["not_compared"]) == {"model.embed_tokens.weight", "lm_head.weight", "score.weight"}

    got, expected = _sanitize_edit_area_auto(paths, tmp_path / "out")
    assert set(got) == set(expected)
    assert all(bits_equal(got[name], expected[name]) for name in expected)


def test_diff_of_a_lora_adapter_folder_says_so(tmp_path):
    paths = _tiny_llama_triple(tmp_path / "m", layers=2)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    from safetensors.torch import save_file

    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)},
              str(adapter / "adapter_model.safetensors"))
    result = CliRunner().invoke(main, ["diff", str(paths["base"]), str(adapter)])
    err = result.stderr.strip()
    assert result.exit_code != 0 and len(err.splitlines()) == 1 and "is a LoRA adapter, not a model" in err, err


def test_edited_model_edit_area(tmp_path):
    paths = _tiny_llama_triple(tmp_path / "m", layers=6, edit_layer=3)
    result = CliRunner().invoke(main, ["diff", str(paths["base"]), str(paths["target"]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["differing_layers"] == [3] and report["edit_area"] == "2-4"

    got, expected = _sanitize_edit_area_auto(paths, tmp_path / "out")
    for name, value in got.items():
        assert bits_equal(value, expected[name]), name
        if not any(f"layers.{i}." in name for i in (2, 3, 4)):
            assert bits_equal(value, load_folder(paths["target"])[name]), name


def test_already_sanitized_is_refused_without_force(tiny, tmp_path):
    out = tmp_path / "once"
    args = ["sanitize", "--base", str(tiny["base"]), "--harmful", str(tiny["harmful"]), "-q"]
    assert CliRunner().invoke(main, args + ["--target", str(tiny["target"]), "--out", str(out)]).exit_code == 0
    twice = CliRunner().invoke(main, args + ["--target", str(out), "--out", str(tmp_path / "twice")])
    assert twice.exit_code != 0 and "already sanitized" in twice.stderr and "--force" in twice.stderr
    forced = CliRunner().invoke(main, args + ["--target", str(out), "--out", str(tmp_path / "twice"), "--force"])
    assert forced.exit_code == 0, forced.output


@pytest.mark.parametrize("content,override,needle", [
    ("[hdr]\ntopk = 0.1\n", None, "unknown key hdr.topk"),
    ("[hdr]\nscale = \"three\"\n", None, "hdr.scale must be a number"),
    ("[hdr]\ntop_k = 2.0\n", None, "hdr.top_k"),
    ("[models2]\nx = 1\n", None, "unknown section [models2]"),
    ("", "hdr.scale", "section.key=value"),
    ("", "scale=3", "section.key"),
    ("[icv]\nrule = \"mine\"\n", None, "icv.rule must be one of"),
    ("this is = not toml [", None, "not valid TOML"),
])
def test_recipe_errors_are_one_line(tiny, tmp_path, content, override, needle):
    models = "".join(f'{r} = {json.dumps(str(tiny[r]))}\n' for r in ("base", "harmful", "target"))
    text = content if content.startswith("this") else f"[models]\n{models}\n[output]\nout = \"o\"\n\n{content}"
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    args = ["run", str(recipe), "--check"] + (["--set", override] if override else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    err = result.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and needle in err, err


def test_check_names_a_missing_adapter_of_a_base_plus_adapter_target(tiny, tmp_path):
    recipe = tmp_path / "r.toml"
    target = f'{tiny["base"]}+{tmp_path / "no-adapter"}'
    recipe.write_text(f'[models]\nbase = "{tiny["base"]}"\nharmful = "{tiny["harmful"]}"\ntarget = "{target}"\n'
                      '[output]\nout = "o"\n')
    result = CliRunner().invoke(main, ["run", str(recipe), "--check"])
    err = result.stderr.strip()
    assert result.exit_code != 0 and len(err.splitlines()) == 1, err
    assert f"models.target = {target!r}: {str(tmp_path / 'no-adapter')!r}: no such folder" in err, err


@pytest.mark.parametrize("check", [False, True])
def test_recipe_missing_model_is_named(tiny, tmp_path, check):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[models]\nbase = "{tiny["base"]}"\nharmful = "./nowhere/at-all"\ntarget = "{tiny["target"]}"\n'
                      '[output]\nout = "o"\n')
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "o")] + (["--check"] if check else []))
    assert result.exit_code != 0 and "models.harmful" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize("override,key", [
    ("hdr.scale=-3.0", "hdr.scale"),
    ('hdr.max_memory="lots"', "hdr.max_memory"),
    ('hdr.shard_size="big"', "hdr.shard_size"),
    ('hdr.exclude=["("]', "hdr.exclude"),
])
def test_option_errors_name_the_recipe_key(tiny, tmp_path, override, key, check):
    """Values the shared option checks refuse are named by the recipe file and key (not by the
    command-line flag the user never typed), and `--check` refuses them as the run does."""
    models = "".join(f'{r} = {json.dumps(str(tiny[r]))}\n' for r in ("base", "harmful", "target"))
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"[models]\n{models}\n[icv]\nenabled = false\n[output]\nout = \"o\"\n")
    out = tmp_path / "o"
    args = ["run", str(recipe), "--set", override, "--out", str(out)] + (["--check"] if check else [])
    result = CliRunner().invoke(main, args)
    err = result.stderr.strip()
    assert result.exit_code != 0 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {recipe}: {key}") and "--" not in err.split(":")[2], err
    assert not out.exists()


# --------------------------------------------------------------------------- recipe.toml as TOML


AWKWARD_TEXTS = [
    "/models/m \U0001F600/base",                        # outside the BMP: JSON would write a surrogate pair
    'say "hi" \\ C:\\path\\ \\u0041 \\n',               # quotes, backslashes, escape-looking text
    "line 1\nline 2\r\n\ttabbed\b\f",                   # TOML's short escapes
    "nul \x00 bell \x07 esc \x1b unit sep \x1f del \x7f",  # other control characters
    "\u00e9\u4e2d\u2028\u2029\ufeff\U0010FFFF",         # non-ASCII that TOML takes as itself
    "",
]


@pytest.mark.parametrize("text", AWKWARD_TEXTS, ids=range(len(AWKWARD_TEXTS)))
def test_recipe_strings_round_trip_through_tomllib(text):
    import tomllib

    from ckptops.recipe import dump_toml

    written = dump_toml({"models": {"base": text}, "hdr": {"exclude": [text, "x"]}})
    parsed = tomllib.loads(written)
    assert parsed == {"models": {"base": text}, "hdr": {"exclude": [text, "x"]}}
    if "\U0001F600" in text:
        assert "\U0001F600" in written  # written as itself, never as a surrogate-pair escape


def test_a_lone_surrogate_is_a_one_line_recipe_error():
    from ckptops.errors import RecipeError
    from ckptops.recipe import dump_toml

    with pytest.raises(RecipeError, match=r"r\.toml: models\.base holds text that is not valid Unicode") as caught:
        dump_toml({"models": {"base": "/data/bad\udcff/base"}}, "r.toml")
    assert "\n" not in str(caught.value)


def test_the_written_recipe_reruns_with_an_emoji_quote_and_backslash_in_the_paths(tiny, tmp_path):
    models = tmp_path / "models \U0001F600"
    models.symlink_to(tiny["base"].parent, target_is_directory=True)
    out = tmp_path / 'out \U0001F600 "q" \\ x'
    recipe = tmp_path / "r.toml"
    recipe.write_text("[models]\n" + "".join(f"{role} = '{models / role}'\n" for role in ("base", "harmful", "target"))
                      + f"[icv]\nenabled = false\n[output]\nout = '{out}'\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["run", str(recipe), "-q"])
    assert result.exit_code == 0, result.output
    written = (out / "recipe.toml").read_text(encoding="utf-8")
    assert load_recipe(out / "recipe.toml")["output"]["out"] == str(out)
    assert load_recipe(out / "recipe.toml")["models"]["base"] == str(models / "base")
    again = tmp_path / "again"
    result = CliRunner().invoke(main, ["run", str(out / "recipe.toml"), "--out", str(again), "-q"])
    assert result.exit_code == 0, result.output
    assert (again / "recipe.toml").read_text(encoding="utf-8") == written
    for shard in out.glob("model*.safetensors"):
        assert shard.read_bytes() == (again / shard.name).read_bytes()


def test_a_path_toml_cannot_hold_is_refused_before_any_work(tiny, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[models]\n" + "".join(f"{role} = '{tiny[role]}'\n" for role in ("base", "harmful", "target"))
                      + f"[icv]\nenabled = false\n[output]\nout = '{tmp_path / 'o'}'\n", encoding="utf-8")
    undecodable = str(tmp_path / "bad\udcff")  # what Python makes of the byte 0xFF in a file name
    result = CliRunner().invoke(main, ["run", str(recipe), "--set", f"output.out={undecodable}", "-q"])
    assert result.exit_code != 0
    err = result.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "output.out" in err and "not valid Unicode" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]  # nothing written, not even a work folder


@pytest.mark.parametrize("section,override,key", [
    ("icv", 'icv.max_memory="lots"', "icv.max_memory"),
    ("icv", 'icv.max_memory="0"', "icv.max_memory"),
    ("icv", 'icv.layers="x"', "icv.layers"),
    ("icv", 'icv.demos="no-such-demos.jsonl"', "icv.demos"),
    ("harm", 'harm.device="tpu"', "harm.device"),
    ("harm", "harm.rank=0", "harm.rank"),
    ("harm", "harm.steps=0", "harm.steps"),
    ("harm", 'harm.questions="no-such-questions.jsonl"', "harm.questions"),
    ("output", "OUT_IS_BASE", "output.out"),
])
def test_check_refuses_icv_harm_and_output_values_by_key(tiny, tmp_path, section, override, key):
    """`run --check` refuses the [icv], [harm] and [output] values the run would refuse (the ICV
    ones only after the whole HDR before), naming the recipe file and key, not a flag."""
    harmful = "" if section == "harm" else f'harmful = {json.dumps(str(tiny["harmful"]))}\n'
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[models]\nbase = {json.dumps(str(tiny["base"]))}\n{harmful}'
                      f'target = {json.dumps(str(tiny["target"]))}\n'
                      + ("[harm]\nmake = true\n" if section == "harm" else "")
                      + f'[output]\nout = {json.dumps(str(tmp_path / "o"))}\n')
    if override == "OUT_IS_BASE":
        override = f"output.out={json.dumps(str(tiny['base']))}"
    result = CliRunner().invoke(main, ["run", str(recipe), "--set", override, "--check"])
    err = result.stderr.strip()
    assert result.exit_code != 0 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {recipe}: {key}"), err
