"""Perplexity on a benign text file: the one-number check that sanitizing kept the model fluent.

Safety edits can make a model refuse by breaking it. Perplexity on ordinary text, measured the
same way before and after, shows that cost: a few percent is the price the paper reports;
doubling means the model was damaged.

How it is measured (the strided sliding window of the transformers "Perplexity of fixed-length
models" guide, with exact token counting):

- The file is read and tokenized **in pieces** (about ``chunk_chars`` characters, cut at line
  ends), so a text larger than memory streams through. A piece boundary can tokenize slightly
  differently from the whole text at its first token (e.g. a SentencePiece word-start marker);
  with 64 KiB pieces that is a handful of tokens per 10 000.
- When the tokenizer normally starts a sequence with a BOS token, one BOS is put before the text
  (it is context, never scored).
- The first window scores tokens 1 to ``window - 1``; each later window scores the next
  ``stride`` tokens, with the ``window - stride`` tokens before them as context (windows end
  every ``stride`` tokens). Each token after the first is scored exactly once, and every
  scored token past the first window sees at least ``window - stride`` tokens of context:
  half a window with the default ``stride = window // 2``. ``stride = window - 1`` is nearly
  disjoint chunks (fastest, highest perplexity).
- Perplexity = exp(total negative log-likelihood / tokens scored), computed in float64 from
  float32 log-probabilities.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ckptops.evaluate._errors import EvalError
from ckptops.evaluate.generate import require_transformers

DEFAULT_WINDOW = 1024
DEFAULT_CHUNK_CHARS = 64 * 1024


@dataclass(frozen=True)
class PerplexityResult:
    """The perplexity of one model on one file, with what it was computed from."""

    path: str
    perplexity: float
    nll_sum: float  # total negative log-likelihood in nats
    tokens_scored: int
    window: int
    stride: int
    seconds: float
    #: SHA-256 of the scored token ids: two models' perplexities compare only when it matches
    #: (the same text split by the same tokenizer), see ``report.perplexity_ratio``
    tokens_sha256: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "perplexity": self.perplexity,
            "nll_per_token": self.nll_sum / self.tokens_scored if self.tokens_scored else math.nan,
            "tokens_scored": self.tokens_scored,
            "window": self.window,
            "stride": self.stride,
            "tokens_sha256": self.tokens_sha256,
            "seconds": round(self.seconds, 3),
        }


def _iter_text_pieces(path: Path, chunk_chars: int) -> Iterator[str]:
    """Yield pieces of at least ``chunk_chars`` characters (except the last), cut at line ends."""
    pending: list[str] = []
    size = 0
    try:
        with path.open("r", encoding="utf-8") as handle:
            for line in handle:
                pending.append(line)
                size += len(line)
                if size >= chunk_chars:
                    yield "".join(pending)
                    pending, size = [], 0
    except UnicodeDecodeError as exc:
        raise EvalError(f"{path}: not UTF-8 text (byte {exc.start} of a block)") from None
    if pending:
        yield "".join(pending)


def _starts_with_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def iter_token_ids(tokenizer: Any, path: Path, *, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> Iterator[int]:
    """The file's token ids, one at a time, tokenized piece by piece."""
    if _starts_with_bos(tokenizer):
        yield int(tokenizer.bos_token_id)
    for piece in _iter_text_pieces(path, chunk_chars):
        yield from tokenizer(piece, add_special_tokens=False)["input_ids"]


def perplexity(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    *,
    window: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on the text in ``path`` (see the module docstring for the method).

    Args:
        window: tokens per forward pass; default the smaller of 1024 and the model's
            ``max_position_embeddings``.
        stride: new tokens scored per window after the first, ``1 <= stride < window``;
            default ``window // 2``.
        max_tokens: stop after the file's first ``max_tokens`` tokens (quick checks).
        chunk_chars: characters tokenized at a time.

    Raises:
        EvalError: the file is missing or not UTF-8, holds fewer than two tokens, or the window
            and stride are out of range.
    """
    require_transformers()
    import torch
    from tqdm.auto import tqdm

    from ckptops.safeio import open_regular

    path = Path(path)
    os.close(open_regular(path, EvalError, "perplexity text file"))  # no FIFO or /dev/zero: it streams
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if window is None:
        window = min(DEFAULT_WINDOW, limit) if limit else DEFAULT_WINDOW
    if window < 2:
        raise EvalError(f"perplexity window must be at least 2 tokens, got {window}")
    if limit and window > limit:
        raise EvalError(f"perplexity window {window} is longer than the model's {limit} positions")
    if stride is None:
        stride = max(1, window // 2)
    if not 1 <= stride < window:
        raise EvalError(f"perplexity stride must be at least 1 and less than the window ({window}), got {stride}")
    if max_tokens is not None and max_tokens < 2:
        raise EvalError(f"perplexity max tokens must be at least 2, got {max_tokens}")

    device = getattr(model, "device", None) or torch.device("cpu")
    tokens = iter_token_ids(tokenizer, path, chunk_chars=chunk_chars)
    if max_tokens is not None:
        tokens = (t for i, t in zip(range(max_tokens), tokens))
    digest = hashlib.sha256()
    tokens = _hashed(tokens, digest)

    buffer: deque[int] = deque()  # tokens from global index `offset` on
    offset = 0
    scored_until = 1  # every token before this index is scored (token 0 never is)
    nll_sum = 0.0
    scored = 0
    exhausted = False
    started = time.perf_counter()
    bar = tqdm(unit="tok", desc=f"perplexity {path.name}", disable=not progress, leave=False)
    was_training = model.training
    model.eval()
    try:
        while True:
            wanted_end = max(scored_until + stride, window)
            while not exhausted and offset + len(buffer) < wanted_end:
                try:
                    buffer.append(next(tokens))
                except StopIteration:
                    exhausted = True
            end = min(wanted_end, offset + len(buffer))
            if end <= scored_until:
                break  # everything is scored
            begin = max(0, end - window)
            while offset < begin:  # context before this window is never needed again
                buffer.popleft()
                offset += 1
            ids = torch.tensor([list(buffer)[: end - offset]], dtype=torch.long, device=device)
            with torch.inference_mode():
                logits = model(input_ids=ids, use_cache=False).logits[0]
            first = scored_until - begin  # window position of the first target; >= 1
            log_probs = torch.log_softmax(logits[first - 1 : end - begin - 1].float(), dim=-1)
            targets = ids[0, first : end - begin]
            nll_sum += float(-log_probs.gather(1, targets.unsqueeze(1)).double().sum())
            scored += end - scored_until
            bar.update(end - scored_until)
            scored_until = end
    finally:
        bar.close()
        if was_training:
            model.train()
    if scored == 0:
        raise EvalError(f"{path}: fewer than two tokens of text; nothing to score")
    return PerplexityResult(
        path=str(path),
        perplexity=math.exp(nll_sum / scored),
        nll_sum=nll_sum,
        tokens_scored=scored,
        window=window,
        stride=stride,
        seconds=time.perf_counter() - started,
        tokens_sha256=digest.hexdigest(),
    )


def _hashed(tokens: Iterator[int], digest) -> Iterator[int]:
    """Pass the token ids through, adding each to ``digest`` (8 bytes, little-endian)."""
    for token in tokens:
        digest.update(int(token).to_bytes(8, "little", signed=True))
        yield token
