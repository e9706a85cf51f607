"""``ckptops tune`` on a tiny (base, harmful, target) triple of transformers folders.

The behaviour figures of a tiny random model mean nothing, so the search is tested with a judge
stub whose verdicts are a known function of the weights (and ICV) the model holds when it judges:
it answers "refusal" only when the model's weights equal, bit for bit, an in-memory reference HDR
of one known candidate (written in the test, :mod:`hdr_reference`) and that candidate's ICV
alpha is applied. The search must find exactly that candidate.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from hdr_reference import load_folder, reference_hdr
from tune_fixtures import write_prompt_files, write_triple

from ckptops.cli import main
from ckptops.errors import UsageError
from ckptops.icv.patch import icv_handle
from ckptops.tune.prompts import load_split
from ckptops.tune.run import TuneSession, tune

BEST = {"scale": 2.0, "top_k": 0.2, "alpha": 0.12}


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    folders = write_triple(root / "models")
    harmful, xs = write_prompt_files(root / "prompts")
    return folders, harmful, xs


@pytest.fixture(scope="module")
def session(triple):
    folders, _, _ = triple
    opened = TuneSession(folders["base"], folders["harmful"], folders["target"])
    yield opened
    opened.close()


def _same_bits(expected: dict[str, torch.Tensor], model) -> list[str]:
    """Names whose model values differ from ``expected`` (compared in the checkpoint dtype)."""
    state = model.state_dict()
    bad = []
    for name, value in expected.items():
        got = state[name].to(value.dtype)
        if got.view(torch.int16 if value.element_size() == 2 else torch.int32).ne(
                value.view(torch.int16 if value.element_size() == 2 else torch.int32)).any():
            bad.append(name)
        if not torch.equal(state[name], value.to(state[name].dtype)):  # the upcast is exact as well
            bad.append(name)
    return bad


@pytest.mark.parametrize("scale,top_k,scope", [(3.0, 0.1, "global"), (0.5, 0.05, "layer"), (-1.25, 0.3, "tensor"),
                                               (2.0, 1.0, "global")])
def test_in_memory_candidate_equals_sanitize_bit_for_bit(triple, tmp_path, scale, top_k, scope):
    from ckptops.hdr.sanitize import sanitize
    from ckptops.icv.load import load_model
    from ckptops.tune.apply import InMemoryHDR

    folders, _, _ = triple
    out = tmp_path / "sanitized"
    # force: sanitize refuses a negative scale (it adds the harm vector) unless told
    sanitize(folders["base"], folders["harmful"], folders["target"], out, top_k=top_k, scale=scale, scope=scope,
             progress=False, force=scale < 0)
    written = load_file(str(out / "model.safetensors"))
    expected = reference_hdr(load_folder(folders["base"]), load_folder(folders["harmful"]),
                             load_folder(folders["target"]), top_k=top_k, scale=scale, scope=scope)[0]
    loaded = load_model(folders["target"], dtype=torch.float32, quiet=True, hash_weights=False)
    # a small chunk so that tensors span several chunks
    hdr = InMemoryHDR(folders["base"], folders["harmful"], folders["target"], loaded.model, scope=scope, chunk=777)
    hdr.apply(1.5, 0.5)  # another candidate first: the next one must not depend on it
    hdr.apply(scale, top_k)
    assert _same_bits(written, loaded.model) == []
    assert _same_bits(expected, loaded.model) == []
    hdr.restore()
    assert _same_bits(load_folder(folders["target"]), loaded.model) == []
    hdr.close()


def test_split_parts_never_overlap_and_follow_the_seed(tmp_path):
    harmful = tmp_path / "h.jsonl"
    texts = [f"harmful prompt number {i}" for i in range(40)] + ["harmful prompt number 3"]  # one duplicate
    harmful.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    benign = tmp_path / "b.csv"
    rows = ["prompt,label"] + [f"benign {i},safe" for i in range(30)] + [f"unsafe {i},unsafe" for i in range(10)]
    benign.write_text("\n".join(rows) + "\n")

    parts = load_split(harmful, benign, holdout=0.3, seed=7)
    tune_h, held_h = {p.text for p in parts.tune_harmful}, {p.text for p in parts.held_harmful}
    tune_b, held_b = {p.text for p in parts.tune_benign}, {p.text for p in parts.held_benign}
    assert not tune_h & held_h and not tune_b & held_b
    assert tune_h | held_h == set(texts)                       # every distinct prompt, once
    assert tune_b | held_b == {f"benign {i}" for i in range(30)}  # only the safe rows
    assert len(held_h) == 12 and len(held_b) == 9
    again = load_split(harmful, benign, holdout=0.3, seed=7)
    assert [p.text for p in again.held_harmful] == [p.text for p in parts.held_harmful]
    other = load_split(harmful, benign, holdout=0.3, seed=8)
    assert {p.text for p in other.held_harmful} != held_h
    limited = load_split(harmful, benign, holdout=0.3, seed=7, limit=5)
    assert len(limited.tune_harmful) == 5 and {p.text for p in limited.held_harmful} <= held_h

    # separate held-out files that repeat a tuning prompt are refused
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"prompt": "harmful prompt number 5"}) + "\n")
    with pytest.raises(UsageError, match="also in"):
        load_split(harmful, benign, holdout_harmful=held, holdout_benign=benign)


class WeightJudge:
    """Refusal for every output exactly when the model holds the BEST candidate (weights equal
    to the reference HDR, bit for bit, and the ICV applied with BEST's alpha); else compliance."""

    def __init__(self, model, best_weights: dict[str, torch.Tensor]) -> None:
        self.model, self.best = model, best_weights
        self.calls = 0
        self.__name__ = "weight-judge"

    def __call__(self, prompts, outputs):
        self.calls += 1
        handle = icv_handle(self.model)
        is_best = not _same_bits(self.best, self.model) and handle is not None and handle.alpha == BEST["alpha"]
        return ["refusal" if is_best else "compliance" for _ in outputs]


def test_search_finds_the_known_best_and_its_recipe_reproduces_it(triple, session, tmp_path):
    folders, harmful, xs = triple
    best_weights = reference_hdr(load_folder(folders["base"]), load_folder(folders["harmful"]),
                                 load_folder(folders["target"]), top_k=BEST["top_k"], scale=BEST["scale"])[0]
    judge = WeightJudge(session.model, best_weights)
    out = tmp_path / "report"
    args = dict(holdout=0.4, scales=[1.0, 2.0, 3.0], top_ks=[0.1, 0.2], icv_alphas=[0.0, 0.12], max_new_tokens=4,
                max_kl=1e9, max_broken_increase=1.0, judge=judge, progress=False, session=session)
    result = tune(folders["base"], folders["harmful"], folders["target"], harmful, xs, out, **args)
    assert result.chosen is not None and result.chosen.as_dict() == BEST
    assert len(result.trials) == 12
    report = json.loads((out / "report.json").read_text())
    assert report["chosen"] == BEST
    assert (out / "pareto.md").is_file() and (out / "heldout.md").is_file()
    lines = (out / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 1 + 12 + 4  # header, target, 12 candidates, 4 held-out rows

    # a rerun with the same arguments continues from the log: no trial is measured again
    calls = judge.calls
    again = tune(folders["base"], folders["harmful"], folders["target"], harmful, xs, out, **args)
    assert judge.calls == calls and again.chosen.as_dict() == BEST
    assert len((out / "trials.jsonl").read_text().splitlines()) == len(lines)
    # ... and one with other settings is refused
    with pytest.raises(UsageError, match="other settings"):
        tune(folders["base"], folders["harmful"], folders["target"], harmful, xs, out, **{**args, "max_new_tokens": 5})

    # the written recipe, run by `ckptops run`, reproduces the chosen weights and ICV bit for bit
    recipe = (out / "recipe.toml").read_text()
    assert "scale = 2.0" in recipe and "top_k = 0.2" in recipe and "enabled = true" in recipe
    made = tmp_path / "made"
    cli = CliRunner().invoke(main, ["run", str(out / "recipe.toml"), "--out", str(made), "--quiet"])
    assert cli.exit_code == 0, cli.output
    session.set(result.chosen)
    assert _same_bits(load_file(str(made / "model.safetensors")), session.model) == []
    assert _same_bits(best_weights, session.model) == []
    from ckptops.icv.file import load_icv

    written_icv = load_icv(made / "icv.safetensors")
    cached = session.icv_for((BEST["top_k"], BEST["scale"]))
    assert written_icv.alpha == BEST["alpha"]
    assert all(torch.equal(written_icv.vectors[i], cached.vectors[i]) for i in cached.vectors)


def test_optuna_runs_the_asked_number_of_distinct_trials(triple, session, tmp_path):
    pytest.importorskip("optuna")
    folders, harmful, xs = triple
    calls = []

    def judge(prompts, outputs):
        calls.append(1)
        return ["compliance" for _ in outputs]

    out = tmp_path / "optuna"
    result = tune(folders["base"], folders["harmful"], folders["target"], harmful, xs, out, scales=[0.5, 1, 2, 3],
                  top_ks=[0.1, 0.2], trials=3, max_new_tokens=3, max_kl=1e9, max_broken_increase=1.0,
                  judge=judge, progress=False, session=session)
    assert len(result.trials) == 3 and len({t.candidate.key for t in result.trials}) == 3
    records = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()[1:]]
    assert sum(r["split"] == "tune" for r in records) == 4  # the target and three candidates


@pytest.mark.parametrize("change,message", [
    ({"scales": "1,nan"}, "--scales: nan is not a finite number"),
    ({"scales": "1,inf"}, "--scales: inf is not a finite number"),
    ({"top_ks": "0.1,1.5"}, "--top-ks: 1.5 is not a fraction"),
    ({"top_ks": "0"}, "--top-ks: 0.0 is not a fraction"),
    ({"icv_alphas": "-1"}, "--icv-alphas"),
    ({"scales": "1,x"}, "--scales: 'x' is not a number"),
    ({"harmful_prompts": "EMPTY"}, "prompt file is empty"),
    ({"benign_prompts": "BADLABEL"}, "unknown label 'maybe'"),
])
def test_bad_input_is_one_line_before_any_model_loads(triple, tmp_path, monkeypatch, change, message):
    folders, harmful, xs = triple
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad_label = tmp_path / "bad.csv"
    bad_label.write_text("prompt,label\nhello there,safe\nhi,maybe\n")
    files = {"EMPTY": empty, "BADLABEL": bad_label}

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("ckptops.tune.run.TuneSession", no_model)
    options = {"scales": "1,2", "top_ks": "0.1", "icv_alphas": "0", "harmful_prompts": harmful, "benign_prompts": xs}
    options.update({k: files.get(v, v) if isinstance(v, str) else v for k, v in change.items()})
    out = tmp_path / "out"
    argv = ["tune", "--base", str(folders["base"]), "--harmful", str(folders["harmful"]), "--target",
            str(folders["target"]), "--harmful-prompts", str(options["harmful_prompts"]), "--benign-prompts",
            str(options["benign_prompts"]), "--scales", options["scales"], "--top-ks", options["top_ks"],
            "--icv-alphas", options["icv_alphas"], "--threads", "1", "--out", str(out)]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code in (1, 2), result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not out.exists()


def _compliance_judge():
    """A judge that calls everything compliance and records each call's outputs count."""
    judged: list[int] = []

    def judge(prompts, outputs):
        judged.append(len(outputs))
        return ["compliance" for _ in outputs]

    return judge, judged


def test_a_rerun_with_more_values_measures_only_the_new_ones(triple, session, tmp_path):
    folders, harmful, xs = triple
    judge, judged = _compliance_judge()
    out = tmp_path / "extend"
    common = dict(top_ks=[0.1], max_new_tokens=3, max_kl=1e9, max_broken_increase=1.0, judge=judge, progress=False,
                  session=session)
    first = tune(folders["base"], folders["harmful"], folders["target"], harmful, xs, out, scales=[1.0], **common)
    assert [t.candidate.scale for t in first.trials] == [1.0]
    calls = len(judged)
    second = tune(folders["base"], folders["harmful"], folders["target"], harmful, xs, out, scales=[2.0], **common)
    assert sorted(t.candidate.scale for t in second.trials) == [1.0, 2.0]  # the log's trial is kept
    records = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()[1:]]
    tuned = [r["candidate"]["scale"] for r in records if r["split"] == "tune"]
    assert tuned == [0.0, 1.0, 2.0]  # the target and each candidate measured once
    assert len(judged) - calls <= 2  # at most the new trial and its held-out row
    assert first.new_trials == 1 and second.new_trials == 1  # the second run measured scale 2 only
    assert "(1 new, 1 from trials.jsonl)" in second.summary() and "new" not in first.summary().splitlines()[0]


def test_next_token_logprobs_and_kl_match_an_unbatched_reference():
    from eval_fixtures import make_model, make_tokenizer

    from ckptops.tune.measure import kl_divergence, next_token_logprobs

    model, tokenizer = make_model(0), make_tokenizer()
    other = make_model(1)
    prompts = ["how do i bake bread", "explain why the sky is blue because of air", "hi"]
    got = next_token_logprobs(model, tokenizer, prompts, batch_size=2, chat_template=True)
    got_other = next_token_logprobs(other, tokenizer, prompts, batch_size=2, chat_template=True)
    expected, expected_other = [], []
    with torch.no_grad():
        for prompt in prompts:  # one prompt alone: no padding, all positions computed
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=False)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            expected.append(torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1))
            expected_other.append(torch.log_softmax(other(input_ids=ids).logits[0, -1].double(), -1))
    reference = torch.stack(expected)
    assert torch.allclose(got.double(), reference, atol=1e-5)
    # KL(P || Q) = sum p (log p - log q), averaged over prompts
    kl = sum(float((p.exp() * (p - q)).sum()) for p, q in zip(expected, expected_other)) / len(prompts)
    assert kl_divergence(got, got_other) == pytest.approx(kl, rel=1e-4)
    assert kl_divergence(got, got) == 0.0


def _last_token_logprobs(folder: Path, texts: list[str]) -> list[torch.Tensor]:
    """Each text alone through a model loaded with plain transformers: the reference for KL."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = []
    with torch.no_grad():
        for text in texts:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                     tokenize=False)
            ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"]
            rows.append(torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1))
    return rows


def test_measure_base_adds_theta_b_on_the_held_out_prompts(triple, session, tmp_path):
    folders, harmful, xs = triple
    judge, judged = _compliance_judge()
    out = tmp_path / "with-base"
    args = dict(holdout=0.4, scales=[1.0], top_ks=[0.1], max_new_tokens=3, max_kl=1e9, max_broken_increase=1.0,
                judge=judge, progress=False, session=session, measure_base=True)
    result = tune(folders["base"], folders["harmful"], folders["target"], harmful, xs, out, **args)
    names = list(result.heldout)
    assert names[:2] == ["target (unchanged)", "base theta_b (reference)"]
    base_row = result.heldout["base theta_b (reference)"]
    split = load_split(harmful, xs, holdout=0.4)
    assert (base_row.n_harmful, base_row.n_benign) == (len(split.held_harmful), len(split.held_benign))
    # measured on theta_b itself: its KL against the target equals one computed here, prompt by prompt
    texts = [p.text for p in split.held_benign]
    target_rows, base_rows = _last_token_logprobs(folders["target"], texts), _last_token_logprobs(folders["base"], texts)
    expected = sum(float((p.exp() * (p - q)).sum()) for p, q in zip(target_rows, base_rows)) / len(texts)
    assert expected > 0 and base_row.kl == pytest.approx(expected, rel=1e-4)
    # the base is never a tuning trial, and it is in the report files
    assert all(t.candidate.scale != 0.0 or t.candidate.alpha != 0.0 for t in result.trials)
    assert "base theta_b (reference)" in json.loads((out / "report.json").read_text())["heldout"]
    assert "| base theta_b (reference) |" in (out / "heldout.md").read_text()
    # a rerun reads it from the log: nothing is generated or judged again
    calls = len(judged)
    again = tune(folders["base"], folders["harmful"], folders["target"], harmful, xs, out, **args)
    assert len(judged) == calls
    assert again.heldout["base theta_b (reference)"].counts == base_row.counts
    records = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()[1:]]
    assert sum(r.get("reference") == "base" for r in records) == 1


def test_yardstick_line_places_the_bound_against_the_base():
    from ckptops.tune.choose import Limits
    from ckptops.tune.measure import Measurement
    from ckptops.tune.run import BASE_ROW, _yardstick

    def m(broken_harmful: int, openings: int) -> Measurement:
        counts = {f"{label}_{kind}": 0 for label in ("harmful", "benign")
                  for kind in ("refusal", "compliance", "broken", "openings")}
        counts.update(harmful_broken=broken_harmful, harmful_openings=openings)
        return Measurement(n_harmful=50, n_benign=50, counts=counts, kl=0.0, perplexity=None)

    limits = Limits(max_broken_increase=0.02, max_kl=1.0, max_ppl_increase=None)
    target = m(1, 49)  # 1 of 100 broken: bound 3.0%
    assert _yardstick({"target (unchanged)": target}, limits) == ""
    line = _yardstick({"target (unchanged)": target, BASE_ROW: m(4, 3)}, limits)  # base 4.0%
    assert "breaks 4.0%" in line and "opens 6.0%" in line and "= 3.0%, is 1.0 points below it" in line
    line = _yardstick({"target (unchanged)": target, BASE_ROW: m(2, 0)}, limits)  # base 2.0%
    assert "is 1.0 points above it" in line


def test_measure_base_refuses_a_base_transformers_cannot_run_before_any_model_loads(triple, tmp_path, monkeypatch):
    import shutil

    folders, harmful, xs = triple
    bare = tmp_path / "bare-base"  # the safetensors HDR needs, without config or tokenizer
    bare.mkdir()
    for path in folders["base"].glob("*.safetensors*"):
        shutil.copy(path, bare / path.name)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("ckptops.tune.run.TuneSession", no_model)
    out = tmp_path / "out"
    argv = ["tune", "--base", str(bare), "--harmful", str(folders["harmful"]), "--target", str(folders["target"]),
            "--harmful-prompts", str(harmful), "--benign-prompts", str(xs), "--scales", "1", "--top-ks", "0.1",
            "--threads", "1", "--out", str(out), "--measure-base"]
    result = CliRunner().invoke(main, argv)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code in (1, 2) and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: --measure-base: {bare} has no config.json and no tokenizer"), lines[0]
    assert not out.exists()


def test_measure_base_that_fails_to_load_late_costs_only_its_row(triple, session, tmp_path):
    import shutil

    folders, harmful, xs = triple
    broken = tmp_path / "base-unloadable"
    shutil.copytree(folders["base"], broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "no-such-architecture"}))
    said = []
    judge, _ = _compliance_judge()
    out = tmp_path / "late"
    result = tune(broken, folders["harmful"], folders["target"], harmful, xs, out, holdout=0.4, scales=[1.0],
                  top_ks=[0.1], max_new_tokens=3, max_kl=1e9, max_broken_increase=1.0, judge=judge, progress=False,
                  session=session, measure_base=True, log=said.append)
    assert "base theta_b (reference)" not in result.heldout and "target (unchanged)" in result.heldout
    assert any(line.startswith("warning: --measure-base: ") and str(broken) in line for line in said), said
    assert (out / "heldout.md").is_file() and "Yardstick" not in (out / "heldout.md").read_text()
    assert not any('"reference"' in line for line in (out / "trials.jsonl").read_text().splitlines())


def test_broken_examples_list_the_broken_answers_and_count_those_the_base_shares():
    from ckptops.tune.measure import Measurement
    from ckptops.tune.report import broken_examples

    def m(verdicts: dict[str, str]) -> Measurement:
        outputs = [{"label": "harmful", "prompt": p, "output": f"answer to {p}\nline two", "verdict": v,
                    "reason": f"why {p}"} for p, v in verdicts.items()]
        return Measurement(n_harmful=len(verdicts), n_benign=0, counts={}, kl=None, perplexity=None, outputs=outputs)

    edited = m({"p1": "degenerate", "p2": "compliance", "p3": "empty", "p4": "degenerate", "p5": "refusal"})
    base = m({"p1": "compliance", "p2": "degenerate", "p3": "empty", "p4": "compliance", "p5": "compliance"})
    text = broken_examples(edited, base, limit=2)
    assert text.startswith("Broken answers (3 of 5), the first 2 ")
    items = [line for line in text.splitlines() if line.startswith("- ")]
    assert items == ['- harmful: "p1" -> "answer to p1\\nline two" (why p1)',
                     '- harmful: "p3" -> "answer to p3\\nline two" (why p3)']
    assert "1 of the 3 broken prompts also break the base theta_b (which breaks 2)" in text  # p3 only
    assert "base" not in broken_examples(edited, None)
    assert broken_examples(m({"p1": "compliance"}), base) == ""


# --- input checks before any model loads, and the log's identity of its inputs ---------------------------

def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the input was checked")


def _cli_argv(folders, harmful, xs, out, *extra) -> list[str]:
    """The ``tune`` command line that matches :data:`LOGGED` (the same settings, so the same log)."""
    return ["tune", "--base", str(folders["base"]), "--harmful", str(folders["harmful"]), "--target",
            str(folders["target"]), "--harmful-prompts", str(harmful), "--benign-prompts", str(xs), "--scales", "1",
            "--top-ks", "0.1", "--max-new-tokens", "3", "--max-kl", "1e9", "--max-broken-increase", "1",
            "--threads", "1", "-q", "--out", str(out), *extra]


LOGGED = dict(scales=[1.0], top_ks=[0.1], max_new_tokens=3, max_kl=1e9, max_broken_increase=1.0, judge="keyword",
              progress=False)


@pytest.fixture(scope="module")
def finished_log(triple, session, tmp_path_factory) -> bytes:
    """The trials.jsonl of a finished run with the settings of :func:`_cli_argv`."""
    folders, harmful, xs = triple
    out = tmp_path_factory.mktemp("logged") / "report"
    tune(folders["base"], folders["harmful"], folders["target"], harmful, xs, out, session=session, **LOGGED)
    return (out / "trials.jsonl").read_bytes()


def _edit_line(data: bytes, number: int, edit) -> bytes:
    lines = data.split(b"\n")
    lines[number - 1] = edit(lines[number - 1])
    return b"\n".join(lines)


def _json_edit(change):
    def edit(line: bytes) -> bytes:
        record = json.loads(line)
        change(record)
        return json.dumps(record).encode()
    return edit


@pytest.mark.parametrize("edit,number,message", [
    (_json_edit(lambda r: r["candidate"].update(bogus=1)), 3, "candidate must hold exactly scale, top_k and alpha"),
    (_json_edit(lambda r: r["candidate"].pop("alpha")), 3, "candidate must hold exactly scale, top_k and alpha"),
    (_json_edit(lambda r: r.update(measurement={})), 3, "measurement n_harmful is None, not a count"),
    (lambda line: b"[1, 2, 3]", 3, "a list, not a trial record"),
    (_json_edit(lambda r: r["candidate"].update(scale="0.5")), 3, "candidate scale is '0.5', not a finite number"),
    (_json_edit(lambda r: r["candidate"].update(scale=-1.0)), 3, "candidate scale -1 is negative"),
    (_json_edit(lambda r: r["measurement"]["counts"].update(harmful_refusal="1")), 2,
     "measurement counts harmful_refusal is '1', not a count"),
    (_json_edit(lambda r: r["measurement"]["outputs"][0].update(prompt=None)), 2, "measurement outputs[0] lacks one"),
    (_json_edit(lambda r: r.update(split="other")), 3, "split is 'other'"),
    (lambda line: b"null", 1, "not a ckptops tune log"),
    (lambda line: b'{"format": "ckptops.tune.trials/2"}', 1, "the format record lacks its settings"),
    (_json_edit(lambda r: r.update(format="ckptops.tune.trials/1")), 1, "written by an earlier ckptops"),
    (lambda line: b"\xff\xfe", 2, "not a line of JSON text"),
])
def test_a_damaged_log_is_one_line_before_any_model_loads(triple, finished_log, tmp_path, monkeypatch, edit, number,
                                                          message):
    folders, harmful, xs = triple
    out = tmp_path / "report"
    out.mkdir()
    damaged = _edit_line(finished_log, number, edit)
    (out / "trials.jsonl").write_bytes(damaged)
    monkeypatch.setattr("ckptops.tune.run.TuneSession", _no_model)
    result = CliRunner().invoke(main, _cli_argv(folders, harmful, xs, out))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code in (1, 2) and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {out / 'trials.jsonl'}:{number}: {message}"), lines[0]
    assert lines[0].endswith("move the file away to start over"), lines[0]
    assert (out / "trials.jsonl").read_bytes() == damaged  # the log is left as it was


@pytest.mark.parametrize("tail", [b'{"split": "tune", "candidate": {"sca', b"\xff\xfe", b'{"split": "\xc3'])
def test_a_torn_last_line_is_cut_off_and_the_run_continues(triple, session, finished_log, tmp_path, tail):
    """A killed run leaves a cut last line (broken JSON, or bytes that are no UTF-8 yet): that
    trial simply runs again; the complete lines are kept byte for byte."""
    folders, harmful, xs = triple
    out = tmp_path / "report"
    out.mkdir()
    (out / "trials.jsonl").write_bytes(finished_log + tail)
    result = tune(folders["base"], folders["harmful"], folders["target"], harmful, xs, out, session=session, **LOGGED)
    assert result.new_trials == 0
    assert (out / "trials.jsonl").read_bytes() == finished_log


def test_the_log_identifies_models_and_files_by_content(triple, session, tmp_path):
    """The same paths holding other files are other inputs: a rerun is refused before any
    work (it would report the old model's figures); with nothing changed it continues."""
    import shutil

    folders, harmful, xs = triple
    models = {role: tmp_path / role for role in ("base", "harmful", "target")}
    for role, folder in models.items():
        shutil.copytree(folders[role], folder)
    text = tmp_path / "ppl.txt"
    text.write_text("how do i bake bread . explain why the sky is blue because of air .\n")
    judge, judged = _compliance_judge()
    out = tmp_path / "report"
    args = dict(scales=[1.0], top_ks=[0.1], max_new_tokens=3, max_kl=1e9, max_broken_increase=1.0, judge=judge,
                progress=False, session=session, ppl=text)
    tune(models["base"], models["harmful"], models["target"], harmful, xs, out, **args)
    logged = (out / "trials.jsonl").read_bytes()
    calls = len(judged)
    again = tune(models["base"], models["harmful"], models["target"], harmful, xs, out, **args)
    assert again.new_trials == 0 and len(judged) == calls  # nothing changed: continued, nothing measured

    weights = models["target"] / "model.safetensors"
    original = weights.read_bytes()
    shutil.copy(models["harmful"] / "model.safetensors", weights)  # another model under the same path
    with pytest.raises(UsageError, match=r"made with other settings \(target differ\)"):
        tune(models["base"], models["harmful"], models["target"], harmful, xs, out, **args)
    weights.write_bytes(original)
    # the same weights with another file transformers reads (a new chat template, say)
    loading = next(models["target"] / name for name in ("tokenizer_config.json", "config.json")
                   if (models["target"] / name).is_file())
    kept = loading.read_bytes()
    loading.write_bytes(kept.rstrip() + b"\n\n")
    with pytest.raises(UsageError, match=r"made with other settings \(target differ\)"):
        tune(models["base"], models["harmful"], models["target"], harmful, xs, out, **args)
    loading.write_bytes(kept)
    text.write_text("a different text .\n")
    with pytest.raises(UsageError, match=r"made with other settings \(ppl differ\)"):
        tune(models["base"], models["harmful"], models["target"], harmful, xs, out, **args)
    assert len(judged) == calls and (out / "trials.jsonl").read_bytes() == logged


def test_negative_scales_are_refused_and_scale_0_is_the_target():
    from ckptops.tune.space import grid

    with pytest.raises(UsageError, match=r"--scales: -0.5 is negative: HDR would ADD the harm vector"):
        grid([1.0, -0.5], [0.1], [0.0])
    assert grid([0.0], [0.1], [0.0])[0].is_target


def test_prompts_shared_between_labels_are_refused(tmp_path):
    def write(name: str, texts: list[str]) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        return path

    harmful = write("h.jsonl", [f"harmful {i}" for i in range(4)])
    benign = write("b.jsonl", [f"benign {i}" for i in range(4)])
    mixed = write("m.jsonl", ["benign 9", "harmful 2", "harmful 3"])
    with pytest.raises(UsageError) as caught:
        load_split(harmful, mixed)
    assert str(caught.value) == (f"--benign-prompts {mixed}: 2 prompt(s) also in --harmful-prompts {harmful} "
                                 "(e.g. 'harmful 2'); a prompt cannot be both harmful and benign")
    # held-out prompts the search saw under the other label
    held_h, held_b = write("hh.jsonl", ["new harmful"]), write("hb.jsonl", ["new benign", "harmful 1"])
    with pytest.raises(UsageError) as caught:
        load_split(harmful, benign, holdout_harmful=held_h, holdout_benign=held_b)
    assert str(caught.value) == (f"--holdout-benign {held_b}: 1 prompt(s) also in --harmful-prompts {harmful} "
                                 "(e.g. 'harmful 1'); held-out prompts must be new to the search")
    with pytest.raises(UsageError, match="cannot be both harmful and benign"):
        load_split(harmful, benign, holdout_harmful=held_b, holdout_benign=held_b)
    long = "x" * 100
    with pytest.raises(UsageError, match=r"\(e.g. 'x{60}'\)"):
        load_split(write("l1.jsonl", [long, "a"]), write("l2.jsonl", [long, "b"]))
    # --holdout and separate held-out files exclude each other (docs: [--holdout F | --holdout-harmful ...])
    with pytest.raises(UsageError, match="--holdout splits the prompt files"):
        load_split(harmful, benign, holdout=0.3, holdout_harmful=held_h, holdout_benign=write("ok.jsonl", ["fine"]))
    assert len(load_split(harmful, benign).held_harmful) == 2  # no --holdout: half


class _Stop(UsageError):
    pass


def test_options_that_would_do_nothing_are_warned_about(triple, tmp_path, monkeypatch):
    folders, harmful, xs = triple

    def stop(*args, **kwargs):  # the checks ran; stop where the model would load
        raise _Stop("stopped before the model")

    monkeypatch.setattr("ckptops.tune.run.TuneSession", stop)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, _cli_argv(folders, harmful, xs, out, "--max-ppl-increase", "0.03",
                                                "--exclude", "no_such_tensor", "--exclude", ".*"))
    lines = [line for line in result.output.splitlines() if line.strip()]
    n_tensors = len(load_file(str(folders["target"] / "model.safetensors")))
    assert lines == [
        "warning: --max-ppl-increase 0.03 has no effect without --ppl (no perplexity is measured); it is ignored",
        f"warning: --exclude 'no_such_tensor' matches no tensor of {folders['target']}; nothing is excluded by it",
        (f"warning: --exclude excludes every tensor HDR could change ({n_tensors} of {n_tensors}): nothing takes "
         "part in HDR, so every candidate equals the target"),
        "error: stopped before the model",
    ], result.output
    result = CliRunner().invoke(main, _cli_argv(folders, harmful, xs, out, "--exclude", "embed"))
    assert [line for line in result.output.splitlines() if line.strip()] == ["error: stopped before the model"]


def test_write_best_is_checked_before_any_model_loads(triple, tmp_path, monkeypatch):
    folders, harmful, xs = triple
    monkeypatch.setattr("ckptops.tune.run.TuneSession", _no_model)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").mkdir()
    out = tmp_path / "out"
    cases = [
        ("taken", out, "--write-best taken: already exists; choose a new folder"),
        (str(out), out, f"--write-best {out} is --out {out} or inside it (the report folder); choose a folder outside it"),
        (str(out / "m"), out, f"--write-best {out / 'm'} is --out {out} or inside it"),
        ("model", tmp_path / "model" / "report", f"--out {tmp_path / 'model' / 'report'} is inside --write-best model"),
        (str(folders["target"] / "best"), out,
         f"--write-best {folders['target'] / 'best'} is inside the input folder {folders['target']}"),
    ]
    for write_best, report, message in cases:
        result = CliRunner().invoke(main, _cli_argv(folders, harmful, xs, report, "--write-best", write_best))
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code in (1, 2) and len(lines) == 1, result.output
        assert lines[0].startswith(f"error: {message}"), lines[0]
        assert "--overwrite" not in lines[0] and not report.exists()


def test_ctrl_c_during_the_search_says_what_the_log_keeps(triple, tmp_path, monkeypatch):
    """tune's OUT is a log a rerun continues: an interrupt leaves the trials measured so far, and
    the message must say so (not "OUT unchanged")."""
    import sys

    import ckptops.tune.run as run_module

    folders, harmful, xs = triple
    real_measure, calls = run_module.measure, []

    def measure_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the target and the first candidate are measured and logged
            raise KeyboardInterrupt
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(run_module, "measure", measure_then_interrupt)
    out = tmp_path / "report"
    argv = _cli_argv(folders, harmful, xs, out, "--scales", "1,2")
    monkeypatch.setattr(sys, "argv", ["ckptops", *argv])  # the message names --out from the command line
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 130, result.output
    records = (out / "trials.jsonl").read_text().splitlines()[1:]
    assert len(records) == 2
    assert result.output.strip().splitlines() == [
        (f"error: interrupted; {out} keeps the 1 candidate(s) measured so far in trials.jsonl (with the "
         "target's figures); rerun the same command to continue")]


def test_the_recipe_records_each_part_of_base_plus_adapter_absolute(tmp_path, monkeypatch):
    """tune's recipe.toml must run from any folder: a relative BASE+ADAPTER target is recorded
    with both parts absolute (it was kept as typed while base and harmful were absolute)."""
    from ckptops.tune.run import _identity

    for name in ("base", "adapter"):
        (tmp_path / "m" / name).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert _identity("m/base+m/adapter") == f"{tmp_path / 'm' / 'base'}+{tmp_path / 'm' / 'adapter'}"
    assert _identity("m/base") == str(tmp_path / "m" / "base") and _identity("org/name") == "org/name"
