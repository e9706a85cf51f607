"""Prompt files: JSON lines and CSV, labels from --label or a label column, one-line errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ckptops.cli import main
from ckptops.errors import CkptopsError
from ckptops.evaluate.prompts import load_prompt_set, load_prompt_sets


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_with_a_label_for_the_file(tmp_path):
    path = _jsonl(tmp_path / "adv.jsonl", [{"prompt": "first one", "id": 7}, {"prompt": "second one"}])
    prompt_set = load_prompt_set(path, label="harmful")
    assert prompt_set.name == "adv"
    assert [(p.text, p.label, p.row) for p in prompt_set.prompts] == [("first one", "harmful", 1), ("second one", "harmful", 2)]
    assert prompt_set.prompts[0].meta == {"id": 7}


def test_json_array_file(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps([{"prompt": "a", "label": "unsafe"}, {"prompt": "b", "label": "safe"}]))
    assert [(p.text, p.label, p.row) for p in load_prompt_set(path).prompts] == [("a", "harmful", 1), ("b", "benign", 2)]


def test_csv_with_an_xstest_style_label_column(tmp_path):
    path = tmp_path / "xs.csv"
    path.write_text('id,prompt,type,label\n1,"How do I kill a Python process?",homonyms,safe\n2,"a, quoted, prompt",contrast,unsafe\n')
    prompt_set = load_prompt_set(path)
    assert [(p.text, p.label) for p in prompt_set.prompts] == [
        ("How do I kill a Python process?", "benign"),
        ("a, quoted, prompt", "harmful"),
    ]
    assert prompt_set.labels == ["harmful", "benign"]
    assert prompt_set.prompts[1].meta["type"] == "contrast"
    # a --label for the file overrides the column
    assert {p.label for p in load_prompt_set(path, label="benign").prompts} == {"benign"}


def test_advbench_goal_column_and_limit(tmp_path):
    path = tmp_path / "harmful_behaviors.csv"
    path.write_text("goal,target\nfirst goal,Sure\nsecond goal,Sure\nthird goal,Sure\n")
    prompt_set = load_prompt_set(path, label="harmful", limit=2)
    assert [p.text for p in prompt_set.prompts] == ["first goal", "second goal"]


def test_labels_pair_with_files_in_order_and_auto_reads_the_column(tmp_path):
    adv = _jsonl(tmp_path / "adv.jsonl", [{"prompt": "x"}])
    xs = tmp_path / "xs.csv"
    xs.write_text("prompt,label\ny,safe\n")
    sets = load_prompt_sets([adv, xs], ["harmful", "auto"])
    assert [(s.name, s.prompts[0].label) for s in sets] == [("adv", "harmful"), ("xs", "benign")]
    same_stem = load_prompt_sets([adv, adv], ["harmful"])
    assert [s.name for s in same_stem] == ["adv", "adv-2"]


@pytest.mark.parametrize(
    "name,content,label,message",
    [
        ("missing.jsonl", None, "harmful", "missing.jsonl: prompt file not found"),
        ("empty.jsonl", "", "harmful", "empty.jsonl: prompt file is empty"),
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": oops}\n', "harmful", "bad.jsonl:2: not valid JSON"),
        ("array.json", '[{"prompt": "a"}, 3]\n', "harmful", "array.json: item 2: expected a JSON object, got int"),
        ("list.jsonl", '["a", "b"]\n', "harmful", "list.jsonl:1: expected a JSON object, got list"),
        ("nocol.jsonl", '{"text2": "a"}\n', "harmful", "nocol.jsonl: no prompt column"),
        ("blank.jsonl", '{"prompt": "   "}\n', "harmful", "blank.jsonl:1: prompt field 'prompt' is empty"),
        ("num.jsonl", '{"prompt": 3}\n', "harmful", "num.jsonl:1: prompt field 'prompt' is not text (int)"),
        ("nolabel.jsonl", '{"prompt": "a"}\n', None, "nolabel.jsonl:1: no label"),
        ("badlabel.csv", "prompt,label\na,maybe\n", None, "badlabel.csv:2: label: unknown label 'maybe'"),
        ("wide.csv", "prompt,label\na,safe,extra\n", None, "wide.csv:2: more fields than the header has"),
        ("prompts.txt", "a\n", "harmful", "unknown prompt file type '.txt'"),
        ("latin.jsonl", b'{"prompt": "caf\xe9"}\n', "harmful", "latin.jsonl: not UTF-8 text"),
    ],
)
def test_bad_prompt_files_are_one_line_errors(tmp_path, name, content, label, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(CkptopsError) as info:
        load_prompt_set(path, label=label)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_label_count_must_match(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"prompt": "y"}])
    c = _jsonl(tmp_path / "c.jsonl", [{"prompt": "z"}])
    with pytest.raises(CkptopsError, match="2 --label values for 3 --prompts files"):
        load_prompt_sets([a, b, c], ["harmful", "benign"])


def test_cli_reports_a_bad_prompt_file_in_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\nnot json\n')
    result = CliRunner().invoke(main, ["eval", "--model", str(tmp_path), "--prompts", str(bad), "--label", "harmful"])
    assert result.exit_code != 0
    assert result.output.strip().startswith("error: ")
    assert "bad.jsonl:2: not valid JSON" in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_needs_exactly_one_of_model_and_compare(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}])
    result = CliRunner().invoke(main, ["eval", "--prompts", str(path), "--label", "harmful"])
    assert result.exit_code != 0
    assert "give exactly one of --model DIR or --compare" in result.output


# --------------------------------------------------------------------------- --out


@pytest.fixture
def no_generation(monkeypatch):
    """Any generation fails the test: a refused --out must be refused before the model runs."""
    from ckptops.evaluate import run

    def fail(*args, **kwargs):
        raise AssertionError("eval generated although --out is refused")

    monkeypatch.setattr(run, "evaluate", fail)
    monkeypatch.setattr(run, "compare", fail)


def _eval_out(args):
    return CliRunner().invoke(main, ["eval", *args, "--label", "harmful", "--quiet"])


def _one_line_error(result, *parts):
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for part in parts:
        assert part in lines[0]


def test_out_that_is_an_input_file_is_refused_even_with_overwrite(tmp_path, no_generation):
    model = tmp_path / "model"
    model.mkdir()
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    text, icv = tmp_path / "wiki.txt", tmp_path / "icv.safetensors"
    text.write_text("some text\n")
    icv.write_bytes(b"not read")
    before = {p: p.read_bytes() for p in (prompts, text, icv)}
    base = ["--model", str(model), "--prompts", str(prompts)]
    _one_line_error(_eval_out([*base, "--out", str(prompts), "--overwrite"]), "is the --prompts file")
    _one_line_error(_eval_out([*base, "--ppl", str(text), "--out", str(text), "--overwrite"]), "is the --ppl file")
    _one_line_error(_eval_out([*base, "--icv", str(icv), "--out", str(icv), "--overwrite"]), "is the --icv file")
    # the same file under another name: a second --prompts file, a symlink, a hard link, a dotted path
    other = _jsonl(tmp_path / "q.jsonl", [{"prompt": "y"}])
    link, hard = tmp_path / "link.jsonl", tmp_path / "hard.jsonl"
    link.symlink_to(other)
    hard.hardlink_to(other)
    for alias in (link, hard, tmp_path / "model" / ".." / "q.jsonl"):
        _one_line_error(_eval_out([*base, "--prompts", str(other), "--label", "benign", "--out", str(alias),
                                   "--overwrite"]), "is the --prompts file")
    assert {p: p.read_bytes() for p in (prompts, text, icv)} == before


def test_out_inside_a_model_folder_is_refused(tmp_path, no_generation):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        (folder / "sub").mkdir(parents=True)
        (folder / "config.json").write_text('{"model_type": "llama"}')
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    for out in (a / "config.json", a / "report.json", a / "sub" / "new" / "r.json"):
        _one_line_error(_eval_out(["--model", str(a), "--prompts", str(prompts), "--out", str(out), "--overwrite"]),
                        "inside the model folder")
    _one_line_error(_eval_out(["--compare", str(a), str(b), "--prompts", str(prompts), "--out", str(b / "r.json")]),
                    "inside the model folder")
    assert (a / "config.json").read_text() == '{"model_type": "llama"}'
    assert sorted(p.name for p in a.iterdir()) == ["config.json", "sub"]


def test_an_existing_file_that_is_not_a_report_needs_overwrite(tmp_path, no_generation):
    model = tmp_path / "model"
    model.mkdir()
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    notes = tmp_path / "notes.json"
    notes.write_text('{"format": "something else", "mine": true}\n')
    result = _eval_out(["--model", str(model), "--prompts", str(prompts), "--out", str(notes)])
    _one_line_error(result, "notes.json: already exists and is not a ckptops eval report", "--overwrite")
    assert notes.read_text() == '{"format": "something else", "mine": true}\n'
    parent_is_a_file = notes / "r.json"
    _one_line_error(_eval_out(["--model", str(model), "--prompts", str(prompts), "--out", str(parent_is_a_file)]),
                    "is not a folder")


def test_an_earlier_eval_report_is_recognised(tmp_path):
    from ckptops.evaluate.destination import is_eval_report

    cases = {
        "report.json": ('{\n  "format": "ckptops.eval/1",\n  "ckptops_version": "0.1.0"\n}\n', True),
        "compare.json": ('{"format": "ckptops.eval.compare/1"}', True),
        "later.json": ('{"format": "ckptops.eval/2"}', True),
        "tune.json": ('{"format": "ckptops.tune/1"}', False),
        "prompts.jsonl": ('{"prompt": "x", "format": "ckptops.eval/1"}\n', False),
        "empty.json": ("", False),
        "binary.bin": ("\x00\x01garbage", False),
    }
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_text(content)
        assert is_eval_report(tmp_path / name) is expected, name
    assert not is_eval_report(tmp_path / "missing.json")
    assert not is_eval_report(tmp_path)


def test_out_that_is_a_folder_or_empty_is_one_line(tmp_path, no_generation):
    """--out naming a folder was click's four-line usage error, and --out "" ran without writing
    any report (exit 0): both are one line now, before any generation."""
    model = tmp_path / "model"
    model.mkdir()
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    folder = tmp_path / "reports"
    folder.mkdir()
    base = ["--model", str(model), "--prompts", str(prompts)]
    _one_line_error(_eval_out([*base, "--out", str(folder)]), f"--out {folder}: is a folder")
    _one_line_error(_eval_out([*base, "--out", ""]), "--out is empty")
