"""Batched greedy generation through transformers, the way a user would run the model.

Why these choices:

- **Greedy** decoding, so that two runs, and two models compared on the same prompts, differ
  only because the weights (or the ICV) differ, not because of sampling noise.
- **The model's chat template** when its tokenizer has one: an instruction-tuned model is only
  safe (or unsafe) in the format it was tuned on; raw text would measure something else. Without
  a template the prompt is sent as plain text with the tokenizer's usual special tokens.
- **Left padding** in batches: decoder-only models continue from the last position, so padding
  must sit on the left, masked out by the attention mask.
- Prompts are batched **longest first**, so that each batch holds prompts of similar length
  (less padding, less wasted compute); results come back in the caller's order.

transformers is imported inside the functions: ckptops runs without it unless you evaluate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from ckptops.evaluate._errors import EvalError


@dataclass(frozen=True)
class Generation:
    """One model answer: the decoded text and how it ended."""

    output: str
    new_tokens: int  # generated tokens up to and including the first end-of-sequence token
    finished: bool  # True when the model emitted an end-of-sequence token before the limit


@dataclass(frozen=True)
class GenerationStats:
    """Throughput of one generation run (for the report and the progress bar)."""

    prompts: int
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def require_transformers():
    """Import transformers, or raise MissingExtraError naming the extra that provides it."""
    from ckptops.icv._extras import require_transformers as require

    return require("ckptops eval")


def has_chat_template(tokenizer: Any) -> bool:
    """True when the tokenizer carries a chat template (string or named templates)."""
    template = getattr(tokenizer, "chat_template", None)
    return bool(template)


def render_prompts(tokenizer: Any, prompts: Sequence[str], *, chat_template: bool | None = None) -> tuple[list[str], bool]:
    """Turn user prompts into model input text; returns (texts, whether the template was used).

    ``chat_template=None`` uses the template when the tokenizer has one; ``True`` requires it;
    ``False`` sends the raw prompt.
    """
    use_template = has_chat_template(tokenizer) if chat_template is None else chat_template
    if use_template and not has_chat_template(tokenizer):
        raise EvalError("the tokenizer has no chat template; drop --chat-template or use --no-chat-template")
    if not use_template:
        return list(prompts), False
    rendered = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        for prompt in prompts
    ]
    return rendered, True


def _end_token_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    chat_template: bool | None = None,
    progress: bool = True,
    description: str = "generating",
) -> tuple[list[Generation], GenerationStats]:
    """Greedy answers to ``prompts``, in order, with the run's throughput.

    Args:
        model: a transformers causal LM (any device; inputs follow ``model.device``).
        tokenizer: its tokenizer; a missing pad token is set to the end-of-sequence token.
        max_new_tokens: the most tokens generated per prompt.
        batch_size: prompts per forward pass.
        chat_template: see :func:`render_prompts`.
        progress: show a tqdm bar with prompts done and generated tokens per second.
    """
    require_transformers()
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise EvalError(f"max-new-tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise EvalError(f"batch-size must be at least 1, got {batch_size}")
    prepare_tokenizer(tokenizer)
    end_ids = _end_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id

    texts, templated = render_prompts(tokenizer, prompts, chat_template=chat_template)
    lengths = [len(tokenizer(t, add_special_tokens=not templated)["input_ids"]) for t in texts]
    check_context(model, lengths, max_new_tokens, prompts)
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])

    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=int(pad_id),
        eos_token_id=end_ids or None,
        # neutral sampling values so that a model's own sampling defaults do not warn under greedy
        temperature=1.0,
        top_p=1.0,
        top_k=50,
    )
    device = getattr(model, "device", None) or torch.device("cpu")
    results: list[Generation | None] = [None] * len(texts)
    total_new = 0
    started = time.perf_counter()
    bar = tqdm(total=len(texts), unit="prompt", desc=description, disable=not progress, leave=False)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            encoded = tokenizer(
                [texts[i] for i in batch],
                add_special_tokens=not templated,
                padding=True,
                padding_side="left",
                return_tensors="pt",
            )
            input_ids = encoded["input_ids"].to(device)
            attention_mask = encoded["attention_mask"].to(device)
            with torch.inference_mode():
                output = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=config
                )
            new = output[:, input_ids.shape[1] :].cpu()
            for row, index in enumerate(batch):
                tokens = new[row].tolist()
                count, finished = len(tokens), False
                for position, token in enumerate(tokens):
                    if token in end_ids:
                        count, finished = position + 1, True
                        break
                text = tokenizer.decode(tokens[:count], skip_special_tokens=True)
                results[index] = Generation(output=text, new_tokens=count, finished=finished)
                total_new += count
            bar.update(len(batch))
            elapsed = time.perf_counter() - started
            bar.set_postfix_str(f"{total_new / elapsed:.1f} tok/s" if elapsed > 0 else "")
    finally:
        bar.close()
        if was_training:
            model.train()
    stats = GenerationStats(prompts=len(texts), new_tokens=total_new, seconds=time.perf_counter() - started)
    return [r for r in results if r is not None], stats


#: config keys that give a model's context window in tokens, in the order they are trusted
WINDOW_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_window(model: Any) -> int | None:
    """The model's context window in tokens, from its config (None when it does not say)."""
    return config_window(getattr(model, "config", None))


def config_window(config: Any) -> int | None:
    """:func:`context_window` from a loaded config object alone (checks that run before the
    weights load; :func:`ckptops.preflight.config_window` reads a folder's config.json)."""
    for key in WINDOW_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(model: Any, lengths: Sequence[int], max_new_tokens: int, prompts: Sequence[str]) -> None:
    """Refuse, before generating, a prompt that with ``max_new_tokens`` would not fit the
    model's context window (positions past it are untrained: the output is noise, and the work
    grows with the length for nothing)."""
    window = context_window(model)
    if window is None:
        return
    for number, (length, prompt) in enumerate(zip(lengths, prompts), start=1):
        if length + max_new_tokens > window:
            start = " ".join(prompt.split())[:40]
            raise EvalError(
                f"prompt {number} ({start!r}...) is {length} tokens; with {max_new_tokens} new tokens that "
                f"exceeds the model's context window of {window} tokens: shorten it or lower --max-new-tokens"
            )


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give a tokenizer without a pad token its end-of-sequence token as pad (batching needs one)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise EvalError("the tokenizer has neither a pad token nor an end-of-sequence token; cannot batch prompts")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
