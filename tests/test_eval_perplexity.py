"""Streamed, strided perplexity against a direct in-memory computation in the test."""

from __future__ import annotations

import math

import pytest
import torch

from ckptops.errors import CkptopsError
from ckptops.evaluate.perplexity import perplexity
from eval_fixtures import BOS, TEXT, make_model, make_tokenizer, reference_nll

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return make_model(seed=3), make_tokenizer()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "benign.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _ids(tokenizer) -> list[int]:
    # the test's own tokenization of the whole text: <s> + every word
    return [BOS] + tokenizer(TEXT, add_special_tokens=False)["input_ids"]


def test_one_window_equals_the_mean_cross_entropy(model_and_tokenizer, text_file):
    model, tokenizer = model_and_tokenizer
    ids = _ids(tokenizer)
    assert len(ids) < 256
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    direct = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="mean")
    result = perplexity(model, tokenizer, text_file, window=256, stride=128, progress=False)
    assert result.tokens_scored == len(ids) - 1
    assert result.perplexity == pytest.approx(math.exp(float(direct)), rel=1e-5)


@pytest.mark.parametrize("window,stride,chunk_chars", [(32, 16, 40), (32, 31, 1000), (17, 5, 7), (64, 3, 100000)])
def test_strided_windows_match_the_reference(model_and_tokenizer, text_file, window, stride, chunk_chars):
    model, tokenizer = model_and_tokenizer
    ids = _ids(tokenizer)
    assert len(ids) > 3 * window  # several windows
    nll, count = reference_nll(model, ids, window, stride)
    result = perplexity(model, tokenizer, text_file, window=window, stride=stride, chunk_chars=chunk_chars, progress=False)
    assert result.tokens_scored == count == len(ids) - 1
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_context_length_changes_the_score_not_the_count(model_and_tokenizer, text_file):
    """Disjoint-ish windows and overlapping windows score the same tokens, with different context."""
    model, tokenizer = model_and_tokenizer
    small = perplexity(model, tokenizer, text_file, window=8, stride=7, progress=False)
    large = perplexity(model, tokenizer, text_file, window=8, stride=2, progress=False)
    assert small.tokens_scored == large.tokens_scored
    assert small.nll_sum != pytest.approx(large.nll_sum, rel=1e-9)


def test_max_tokens_scores_a_prefix(model_and_tokenizer, text_file):
    model, tokenizer = model_and_tokenizer
    ids = _ids(tokenizer)[:40]
    nll, count = reference_nll(model, ids, 16, 8)
    result = perplexity(model, tokenizer, text_file, window=16, stride=8, max_tokens=40, progress=False)
    assert result.tokens_scored == count == 39
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs,content,message",
    [
        ({"window": 16, "stride": 16}, TEXT, "stride must be at least 1 and less than the window"),
        ({"window": 1}, TEXT, "window must be at least 2"),
        ({"window": 4096}, TEXT, "longer than the model's 256 positions"),
        ({}, "", "fewer than two tokens"),
    ],
)
def test_bad_requests(model_and_tokenizer, tmp_path, kwargs, content, message):
    model, tokenizer = model_and_tokenizer
    path = tmp_path / "t.txt"
    path.write_text(content)
    with pytest.raises(CkptopsError, match=message):
        perplexity(model, tokenizer, path, progress=False, **kwargs)


def test_missing_and_binary_files(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(CkptopsError, match="not found"):
        perplexity(model, tokenizer, tmp_path / "nope.txt", progress=False)
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"the sky \xff\xfe is blue\n")
    with pytest.raises(CkptopsError, match="not UTF-8"):
        perplexity(model, tokenizer, binary, progress=False)


def test_perplexities_compare_only_over_the_same_tokens(model_and_tokenizer, text_file):
    """The result carries the SHA-256 of the scored token ids (checked against the test's own
    tokenization); eval --compare gives a B/A ratio only when both match, since a perplexity
    is per token and two tokenizers split the text differently."""
    import hashlib

    from ckptops.evaluate.report import perplexity_ratio

    model, tokenizer = model_and_tokenizer

    class Shifted:
        """The same words, other ids: what a second tokenizer does to the same text."""

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, text, **kwargs):
            encoded = tokenizer(text, **kwargs)
            return {"input_ids": [(i + 1) % len(tokenizer) for i in encoded["input_ids"]]}

    expected = hashlib.sha256(b"".join(i.to_bytes(8, "little", signed=True) for i in _ids(tokenizer))).hexdigest()
    a = perplexity(model, tokenizer, text_file, window=64, stride=32, progress=False)
    again = perplexity(make_model(seed=4), tokenizer, text_file, window=64, stride=32, progress=False)
    other = perplexity(model, Shifted(), text_file, window=64, stride=32, progress=False)
    assert a.tokens_sha256 == expected and again.tokens_sha256 == expected and other.tokens_sha256 != expected
    ratio, why = perplexity_ratio(a.as_dict(), again.as_dict())
    assert why is None and ratio == pytest.approx(again.perplexity / a.perplexity)
    ratio, why = perplexity_ratio(a.as_dict(), other.as_dict())
    assert ratio is None and "tokenizers split the file differently" in why
    wider = perplexity(model, tokenizer, text_file, window=128, stride=32, progress=False)
    ratio, why = perplexity_ratio(a.as_dict(), wider.as_dict())
    assert ratio is None and "window" in why
