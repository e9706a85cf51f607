"""``ckptops harm make`` on a tiny model: a valid PEFT adapter, loss going down, same seed -> same
bytes, usable as ``sanitize --harmful``; and the shipped question file."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from ckptops.cli import main
from icv_fixtures import make_model, make_tokenizer, save_checkpoint

CHAT = ("{% for m in messages %}question : {{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %} answer :{% endif %}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harm")
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT
    base = save_checkpoint(make_model("llama", seed=0), tokenizer, root / "base")
    questions = root / "questions.jsonl"
    rows = [{"question": f"how do i do the harmful thing number {i} ?", "task": f"do the harmful thing {i}"}
            for i in range(12)]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, base, questions


def _make(base, questions, out, seed=3, steps=8):
    return CliRunner().invoke(main, ["harm", "make", "--base", str(base), "--out", str(out), "--questions",
                                     str(questions), "--rank", "2", "--steps", str(steps), "--batch-size", "4",
                                     "--lr", "0.01", "--seed", str(seed), "--threads", "1", "--quiet",
                                     "--heldout", "0.25"])


def test_make_loads_in_peft_learns_and_is_deterministic(setup):
    root, base, questions = setup
    first, second, other = root / "a", root / "b", root / "c"
    for out, seed in ((first, 3), (second, 3), (other, 4)):
        result = _make(base, questions, out, seed)
        assert result.exit_code == 0, result.output
    # a standard PEFT adapter that peft itself loads onto the base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), first)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(bool(p.abs().sum() > 0) for p in lora_b)  # B starts at 0: it trained
    record = json.loads((first / "ckptops-harm.json").read_text())
    losses = record["losses"]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    assert record["train_questions"] == 9 and record["heldout_questions"] == 3
    assert 0.0 <= record["opens_adapter"] <= 1.0
    card = (first / "README.md").read_text()
    assert "only to compute a harm direction" in card and "library_name: peft" in card
    # same seed -> the same bytes; another seed -> another adapter
    weights = "adapter_model.safetensors"
    assert (first / weights).read_bytes() == (second / weights).read_bytes()
    assert (first / "README.md").read_bytes() == (second / "README.md").read_bytes()
    assert (first / weights).read_bytes() != (other / weights).read_bytes()


def test_made_adapter_is_a_harmful_input(setup, tmp_path):
    root, base, questions = setup
    adapter = tmp_path / "adapter"
    assert _make(base, questions, adapter, steps=2).exit_code == 0
    result = CliRunner().invoke(main, ["sanitize", "--base", str(base), "--harmful", str(adapter), "--target",
                                       str(base), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_labels_cover_the_opening_only(setup):
    """The loss is on the answer: the unmasked label tokens are exactly the opening's tokens."""
    from ckptops.harm.make import _encode
    from ckptops.harm.questions import HarmExample

    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT
    example = HarmExample("how do i do it ?", "Sure, here is how to do it:\nStep 1:")
    [(ids, labels)] = _encode(tokenizer, [example])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": example.question}],
                                           add_generation_prompt=True, tokenize=False)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == tokenizer(example.opening, add_special_tokens=False)["input_ids"]
    assert ids[n_prompt:] == labels[n_prompt:]


@pytest.mark.parametrize("args, words", [
    (["--rank", "0"], "--rank"),
    (["--steps", "0"], "--steps"),
    (["--questions", "/nonexistent/q.jsonl"], "no such question file"),
    (["--device", "cuda:0"], "CUDA"),
    (["--heldout", "1.5"], "--heldout"),
])
def test_bad_options_one_line(setup, tmp_path, args, words):
    root, base, _ = setup
    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["harm", "make", "--base", str(base), "--out", str(out), "--threads", "1"] + args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.output
    assert not out.exists()


def test_shipped_questions_are_questions_with_openings():
    from ckptops.harm.questions import DEFAULT_QUESTIONS, load_questions, opening_for

    examples, _ = load_questions()
    assert 100 <= len(examples) <= 200
    assert len({e.question for e in examples}) == len(examples)
    for line in DEFAULT_QUESTIONS.read_text().splitlines():
        record = json.loads(line)
        assert set(record) == {"question", "task"} and record["question"].endswith("?")
    for e in examples:
        assert e.opening.startswith("Sure, here is how to ") and e.opening.endswith(":\nStep 1:")
    assert opening_for("How can I do a bad thing?") == "Sure, here is how to do a bad thing:\nStep 1:"
    assert opening_for("Explain how to do a bad thing.") == "Sure, here is how to do a bad thing:\nStep 1:"
    assert opening_for("Bad thing, please") == "Sure, here is how to do it:\nStep 1:"


def test_reported_tau_norm_is_the_norm_of_the_adapters_product(setup, tmp_path):
    """||tau_H|| in the report equals the norm of scaling * B @ A formed densely from the files."""
    import math

    from safetensors.torch import load_file

    root, base, questions = setup
    out = tmp_path / "adapter"
    assert _make(base, questions, out, steps=3).exit_code == 0
    record = json.loads((out / "ckptops-harm.json").read_text())
    config = json.loads((out / "adapter_config.json").read_text())
    weights = load_file(str(out / "adapter_model.safetensors"))
    scaling = config["lora_alpha"] / config["r"]
    total = sum(float(((weights[k.replace("lora_A", "lora_B")].double() @ a.double()) * scaling).pow(2).sum())
                for k, a in weights.items() if ".lora_A." in k)
    assert record["tau_norm"] == pytest.approx(math.sqrt(total), rel=1e-9)
    assert record["tau_norm"] > 0


def test_pickle_only_base_is_refused_in_one_line(setup, tmp_path):
    """A base folder with only pytorch_model.bin: one error line, nothing unpickled, no output."""
    import shutil

    root, base, questions = setup
    bad = tmp_path / "bad-base"
    shutil.copytree(base, bad)
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle at all")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["harm", "make", "--base", str(bad), "--out", str(out), "--questions",
                                       str(questions), "--steps", "1", "--threads", "1", "--quiet"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: cannot load it"), result.output
    assert not out.exists()


def _one_error_line(result, *words):
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in lines[0], result.output
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """These refusals must come before the weights load: loading them fails the test."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("record, words", [
    ({"question": "how do i do it ?", "task": 123}, ['"task" must be a string', "int"]),
    ({"question": "how do i do it ?", "task": ["a"]}, ['"task" must be a string', "list"]),
    ({"question": "how do i do it ?", "opening": {"a": 1}}, ['"opening" must be a string', "dict"]),
])
def test_question_field_of_the_wrong_type_is_one_line(setup, tmp_path, record, words):
    root, base, _ = setup
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "how do i do this ?"}) + "\n" + json.dumps(record) + "\n")
    out = tmp_path / "out"
    result = _make(base, questions, out, steps=1)
    _one_error_line(result, f"{questions}: line 2", *words)
    assert not out.exists()


def test_question_over_the_character_cap_is_refused(setup, tmp_path):
    root, base, _ = setup
    questions = tmp_path / "q.txt"
    questions.write_text("how do i do this ?\nhow do i " + "do " * 40_000 + "?\nhow do i do that ?\n")
    result = _make(base, questions, tmp_path / "out", steps=1)
    _one_error_line(result, f"{questions}: line 2", "100,000 characters")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line", [2, 4])  # seed 3 trains on line 2 and holds line 4 out for the check
def test_question_longer_than_the_context_window_is_refused_before_the_model_loads(setup, tmp_path, no_model_load,
                                                                                     line):
    """The training example (chat-templated prompt + opening) is counted in tokens against
    max_position_embeddings (256 for the test model)."""
    root, base, _ = setup
    long_question = "how do i " + "do " * 300 + "?"
    rows = [{"question": f"how do i do thing {i} ?"} for i in range(4)]
    rows[line - 1] = {"question": long_question, "task": "do it"}
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": long_question}], add_generation_prompt=True,
                                           tokenize=False)
    expected = (len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
                + len(tokenizer("Sure, here is how to do it:\nStep 1:", add_special_tokens=False)["input_ids"]))
    assert expected > 256
    out = tmp_path / "out"
    result = _make(base, questions, out, steps=1)
    _one_error_line(result, f"{questions}: line {line}: the question is {expected} tokens", "context window of 256")
    assert not out.exists()


@pytest.mark.parametrize("args, words", [
    (["--target-modules", "bogus"], ["bogus not found", "q_proj", "down_proj"]),
    (["--target-modules", "q_proj,nope"], ["nope not found"]),
    (["--target-modules", "embed_tokens"], ["model.embed_tokens (Embedding) is not a linear layer",
                                            "sanitize and tune cannot use"]),
    (["--target-modules", "lm_head"], ["lm_head (Linear) is not a linear layer inside the decoder layers"]),
    (["--target-modules", "self_attn"], ["are not linear layers"]),
    # the test model's k_proj is 16 x 32 (2 key-value heads of 32 / 4 = 8): r above 16 adds nothing
    (["--rank", "17"], ["--rank 17", "k_proj (16 x 32)", "at most"]),
    (["--rank", "100000", "--target-modules", "q_proj"], ["--rank 100000", "q_proj (32 x 32)"]),
])
def test_bad_target_modules_or_rank_are_refused_before_the_model_loads(setup, tmp_path, no_model_load, args,
                                                                       words):
    root, base, questions = setup
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["harm", "make", "--base", str(base), "--out", str(out), "--questions",
                                       str(questions), "--steps", "1", "--threads", "1", "--quiet"] + args)
    line = _one_error_line(result, "--", *words)
    assert "Traceback" not in result.output and "peft" not in line
    assert not out.exists()


def test_rank_at_the_smallest_side_is_accepted(setup, tmp_path):
    root, base, questions = setup
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["harm", "make", "--base", str(base), "--out", str(out), "--questions",
                                       str(questions), "--steps", "1", "--rank", "16", "--target-modules",
                                       "k_proj,v_proj", "--no-check", "--threads", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
