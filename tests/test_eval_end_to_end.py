"""``ckptops eval`` end to end on a tiny random Llama with a tokenizer built in the test."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from ckptops.cli import main
from ckptops.evaluate.judge import VERDICTS, keyword_verdict
from eval_fixtures import (
    BENIGN_PROMPTS,
    HARMFUL_PROMPTS,
    TEXT,
    make_model,
    make_tokenizer,
    reference_greedy,
    write_model_folder,
    write_prompt_files,
)

pytest.importorskip("transformers")

MAX_NEW = 6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model_dir = write_model_folder(root / "model", seed=0)
    harmful, xs = write_prompt_files(root / "prompts")
    text = root / "benign.txt"
    text.write_text(TEXT)
    return {"root": root, "model": model_dir, "harmful": harmful, "xs": xs, "text": text}


@pytest.fixture(scope="module")
def icv_file(workdir):
    """A tiny ICV with random vectors, strong enough to change a random model's greedy tokens."""
    try:
        from ckptops.icv.file import ICV
    except ImportError as exc:  # pragma: no cover - the ICV module ships with ckptops
        pytest.skip(f"ckptops.icv.file cannot be imported: {exc}")
    generator = torch.Generator().manual_seed(11)
    vectors = {i: torch.randn(32, generator=generator) for i in range(2)}
    icv = ICV(vectors=vectors, hidden_size=32, num_layers=2, model_type="llama", alpha=5.0, source="test")
    return icv.save(workdir["root"] / "icv.safetensors")


def _run(args):
    result = CliRunner().invoke(main, ["eval", *args, "--quiet"])
    assert result.exit_code == 0, result.output
    return result


def _common(workdir, out):
    return [
        "--prompts", str(workdir["harmful"]), "--label", "harmful",
        "--prompts", str(workdir["xs"]), "--label", "auto",
        "--max-new-tokens", str(MAX_NEW), "--batch-size", "3", "--out", str(out),
    ]


def test_eval_runs_end_to_end_with_one_verdict_per_prompt(workdir):
    out = workdir["root"] / "report.json"
    result = _run(["--model", str(workdir["model"]), *_common(workdir, out), "--ppl", str(workdir["text"]), "--ppl-window", "32"])
    report = json.loads(out.read_text())
    rows = report["results"]
    expected = [("harmful", i + 1, "harmful", p) for i, p in enumerate(HARMFUL_PROMPTS)]
    expected += [("xs", i + 2, "benign" if lab == "safe" else "harmful", p) for i, (p, lab) in enumerate(BENIGN_PROMPTS)]
    assert [(r["set"], r["row"], r["label"], r["prompt"]) for r in rows] == expected
    assert all(r["verdict"] in VERDICTS for r in rows)

    # the outputs are what an unbatched, unpadded greedy loop produces, and the verdicts are
    # the judge's verdicts on them
    model, tokenizer = make_model(seed=0), make_tokenizer()
    for row in rows:
        assert row["output"] == reference_greedy(model, tokenizer, row["prompt"], MAX_NEW)
        assert row["verdict"] == keyword_verdict(row["output"]).verdict

    # the summary counts the verdicts per set and label
    by_group = {(s["set"], s["label"]): s for s in report["summary"]}
    assert set(by_group) == {("harmful", "harmful"), ("xs", "benign"), ("xs", "harmful"), ("all", "harmful")}
    for (set_name, label), summary in by_group.items():
        members = [r for r in rows if r["label"] == label and set_name in ("all", r["set"])]
        assert summary["n"] == len(members)
        assert summary["counts"]["refusal"] == sum(r["verdict"] == "refusal" for r in members)
    assert report["perplexity"]["tokens_scored"] > 100
    assert report["settings"]["decoding"] == "greedy"
    assert "refusal [95% CI]" in result.output and "perplexity" in result.output


def test_no_chat_template_sends_the_raw_prompt(workdir):
    out = workdir["root"] / "raw.json"
    _run(["--model", str(workdir["model"]), "--prompts", str(workdir["harmful"]), "--label", "harmful",
          "--max-new-tokens", str(MAX_NEW), "--no-chat-template", "--out", str(out)])
    model, tokenizer = make_model(seed=0), make_tokenizer()
    for row in json.loads(out.read_text())["results"]:
        assert row["output"] == reference_greedy(model, tokenizer, row["prompt"], MAX_NEW, chat_template=False)


def test_icv_is_really_applied(workdir, icv_file):
    plain, steered = workdir["root"] / "plain.json", workdir["root"] / "steered.json"
    _run(["--model", str(workdir["model"]), *_common(workdir, plain)])
    _run(["--model", str(workdir["model"]), "--icv", str(icv_file), *_common(workdir, steered)])
    a = json.loads(plain.read_text())
    b = json.loads(steered.read_text())
    assert b["icv"] == str(icv_file) and a["icv"] is None
    outputs_a = [r["output"] for r in a["results"]]
    outputs_b = [r["output"] for r in b["results"]]
    assert len(outputs_a) == len(outputs_b)
    assert sum(x != y for x, y in zip(outputs_a, outputs_b)) >= len(outputs_a) // 2


def test_compare_reports_paired_deltas(workdir, icv_file):
    out = workdir["root"] / "compare.json"
    result = _run(["--compare", str(workdir["model"]), str(workdir["model"]), "--icv", str(icv_file), *_common(workdir, out)])
    report = json.loads(out.read_text())
    a, b = report["models"]["a"], report["models"]["b"]
    assert a["icv"] is None and b["icv"] == str(icv_file)
    assert len(a["results"]) == len(b["results"]) == len(HARMFUL_PROMPTS) + len(BENIGN_PROMPTS)
    for delta in report["deltas"]:
        members = [i for i, r in enumerate(a["results"]) if r["label"] == delta["label"] and delta["set"] in ("all", r["set"])]
        refused_a = sum(a["results"][i]["verdict"] == "refusal" for i in members)
        refused_b = sum(b["results"][i]["verdict"] == "refusal" for i in members)
        interval = delta["refusal_rate_delta"]
        assert interval["estimate"] == pytest.approx((refused_b - refused_a) / len(members))
        assert interval["low"] <= interval["estimate"] <= interval["high"]
    assert "B-A refusal [95% CI]" in result.output


def test_rerunning_replaces_its_own_report_and_overwrite_replaces_any_file(workdir, tmp_path):
    out = tmp_path / "report.json"
    args = ["--model", str(workdir["model"]), "--prompts", str(workdir["harmful"]), "--label", "harmful",
            "--max-new-tokens", "2", "--limit", "2"]
    _run([*args, "--out", str(out)])
    first = json.loads(out.read_text())
    _run([*args, "--limit", "1", "--out", str(out)])  # the same command again: no --overwrite needed
    assert len(first["results"]) == 2 and len(json.loads(out.read_text())["results"]) == 1
    mine = tmp_path / "mine.txt"
    mine.write_text("my notes\n")
    _run([*args, "--out", str(mine), "--overwrite"])
    assert json.loads(mine.read_text())["format"] == "ckptops.eval/1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt", "report.json"]  # no temporary file left


def test_icv_that_does_not_fit_is_a_one_line_error(workdir, tmp_path):
    from ckptops.icv.file import ICV

    wrong = ICV(vectors={0: torch.ones(16)}, hidden_size=16, num_layers=2, model_type="llama").save(tmp_path / "wrong.safetensors")
    result = CliRunner().invoke(main, ["eval", "--model", str(workdir["model"]), "--icv", str(wrong),
                                       "--prompts", str(workdir["harmful"]), "--label", "harmful", "--quiet"])
    assert result.exit_code != 0
    assert result.output.startswith("error: ") and "hidden size 16" in result.output and "hidden size 32" in result.output
    assert "Traceback" not in result.output


def test_missing_transformers_is_a_missing_extra_error(monkeypatch):
    import sys

    from ckptops.errors import MissingExtraError
    from ckptops.evaluate.generate import require_transformers

    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(MissingExtraError, match=r"pip install -e '\.\[icv\]'"):
        require_transformers()
