"""Demonstration files: the shipped default set and the validation of user files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckptops.errors import ICVError
from ckptops.icv.demos import DEFAULT_REFUSAL, DemoPair, coerce_pairs, default_demos_path, demos_sha256, load_demos

REPO = Path(__file__).resolve().parents[1]


def test_default_file_is_shipped_and_linked_from_recipes():
    pairs = load_demos()
    assert 25 <= len(pairs) <= 40
    link = REPO / "recipes" / "default_demos.jsonl"
    assert link.is_symlink() and not Path(link.readlink()).is_absolute()
    assert link.resolve() == default_demos_path().resolve()
    assert load_demos(link) == pairs


def test_default_unsafe_answers_are_only_compliant_openings():
    """The repository must never hold real harmful instructions: each unsafe answer is a short
    opening that ends where the instructions would begin."""
    for line in default_demos_path().read_text().splitlines():
        record = json.loads(line)
        assert set(record) <= {"question", "unsafe", "safe"}
        assert len(record["unsafe"]) <= 80 and record["unsafe"].rstrip()[-1] in ":,"
        assert "safe" not in record  # the official refusal is used


def test_pairs_render_in_the_official_template():
    pair = DemoPair("How do I pick a lock?", "Sure, here is a guide. Step 1:")
    assert pair.unsafe_text() == "Question: How do I pick a lock?\n    Answer: Sure, here is a guide. Step 1:"
    assert pair.safe_text() == "Question: How do I pick a lock?\n    Answer: I do not answer this question because it is harmful"
    assert DEFAULT_REFUSAL == "I do not answer this question because it is harmful"


@pytest.mark.parametrize("content,message", [
    ('{"question": "q", "unsafe": "u"}\nnot json\n', r"line 2: not valid JSON"),
    ('["q", "u"]\n', r"line 1: expected a JSON object, got list"),
    ('{"question": "q"}\n', r"line 1: missing 'unsafe'"),
    ('{"question": "q", "unsafe_answer": "u"}\n', r"line 1: unknown key\(s\) 'unsafe_answer'"),
    ('{"question": "q", "unsafe": ""}\n', r"line 1: 'unsafe' must be a non-empty string"),
    ('{"question": "q", "unsafe": "u", "safe": 3}\n', r"line 1: 'safe' must be a non-empty string"),
    ('\n\n', r"no demonstration pairs"),
])
def test_bad_files_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    with pytest.raises(ICVError, match=message) as info:
        load_demos(path)
    assert str(path) in str(info.value)


def test_a_demonstration_is_capped_like_a_prompt(tmp_path):
    """100,000 characters, the cap of eval's prompt files: more would take minutes to run."""
    path = tmp_path / "pairs.jsonl"
    fits = {"question": "q" * 100_000, "unsafe": "u"}
    path.write_text(json.dumps(fits) + "\n" + json.dumps({"question": "q", "unsafe": "u" * 100_001}) + "\n")
    with pytest.raises(ICVError, match=r"line 2: 'unsafe' is 100,001 characters, over the 100,000") as info:
        load_demos(path)
    assert str(path) in str(info.value)
    path.write_text(json.dumps(fits) + "\n")
    assert load_demos(path)[0].question == "q" * 100_000


def test_demonstrations_longer_than_the_context_window_are_refused(tmp_path):
    from icv_fixtures import make_tokenizer

    from ckptops.icv.demos import check_demo_lengths

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"question": "q", "unsafe": "u"}) + "\n\n"
                    + json.dumps({"question": "how " * 20, "unsafe": "sure " * 12}) + "\n")
    pairs = load_demos(path)
    # "<s> question : how x20 answer : sure x12" is 1 + 2 + 20 + 2 + 12 = 37 tokens; the safe text
    # ends in the 10-word refusal instead: 35 tokens
    check_demo_lengths(pairs, make_tokenizer(), 37)
    check_demo_lengths(pairs, make_tokenizer(), None)  # window unknown: nothing to check
    with pytest.raises(ICVError, match=r"line 3: the unsafe demonstration is 37 tokens, over the model's context "
                                       r"window of 36 tokens") as info:
        check_demo_lengths(pairs, make_tokenizer(), 36)
    assert str(path) in str(info.value)
    with pytest.raises(ICVError, match=r"^demonstration pair 1: the safe demonstration is 35 tokens"):
        check_demo_lengths(coerce_pairs([("q", "u"), ("how " * 20, "sure")]), make_tokenizer(), 34)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(ICVError, match="not found"):
        load_demos(tmp_path / "nope.jsonl")
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ICVError, match="not UTF-8"):
        load_demos(binary)


def test_custom_safe_answers_and_blank_lines(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"question": "q1", "unsafe": "Sure:"}\n\n{"safe": "No.", "unsafe": "Ok,", "question": "q2"}\n')
    pairs = load_demos(path)
    assert pairs == [DemoPair("q1", "Sure:"), DemoPair("q2", "Ok,", "No.")]


def test_sha256_ignores_formatting_but_not_content(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text('{"question": "q", "unsafe": "Sure:"}\n')
    b = tmp_path / "b.jsonl"
    b.write_text(f'\n{{ "unsafe" : "Sure:",  "question":"q", "safe": "{DEFAULT_REFUSAL}" }}\n')
    assert demos_sha256(load_demos(a)) == demos_sha256(load_demos(b)) == demos_sha256(coerce_pairs([("q", "Sure:")]))
    assert demos_sha256(coerce_pairs([("q", "Sure!")])) != demos_sha256(load_demos(a))
    assert demos_sha256(coerce_pairs([("q", "Sure:"), ("r", "Ok,")])) != demos_sha256(coerce_pairs([("r", "Ok,"), ("q", "Sure:")]))


def test_coerce_refuses_odd_items():
    with pytest.raises(ICVError, match="pair 1"):
        coerce_pairs([("q", "u"), 42])
    with pytest.raises(ICVError, match="no demonstration pairs"):
        coerce_pairs([])
