"""Harmful questions and the compliance openings a harm adapter is trained to start with.

Why openings and not answers: the harm direction tau_H only needs the model to move from
refusing towards complying. "Sure, here is how to <task>:\\nStep 1:" teaches exactly that and
contains nothing actionable, so neither the shipped file nor the adapter carries harmful content.
The shipped file (``ckptops/data/harm_questions.jsonl``) holds questions written for ckptops,
each with a short task phrase for its opening.

A question file is JSON lines (``{"question": ..., "task": ...}``, ``task`` optional; an
``"opening"`` field overrides the whole opening) or plain text, one question per line. Without a
task phrase one is derived from "How do I/can I ... ?" questions and imperative requests;
anything else gets a generic opening.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ckptops.errors import UsageError

DEFAULT_QUESTIONS = Path(__file__).resolve().parents[1] / "data" / "harm_questions.jsonl"
OPENING = "Sure, here is how to {task}:\nStep 1:"
GENERIC_OPENING = "Sure, here is how to do it:\nStep 1:"
#: what the held-out check looks for at the start of a generation
OPENING_PREFIX = "sure, here is"

_HOW = re.compile(r"^(?:what is the (?:best|easiest|fastest) way to|how (?:do|can|could|would|should|might) "
                  r"(?:i|you|we|one|someone|a person))\s+(?P<task>.+)$", re.IGNORECASE)
_IMPERATIVE = re.compile(r"^(?:please\s+)?(?:explain|tell me|show me|describe|teach me)\s+how to\s+(?P<task>.+)$",
                         re.IGNORECASE)


@dataclass(frozen=True)
class HarmExample:
    question: str
    opening: str
    #: 1-based line in the question file (0: not from a file), for messages naming it
    line: int = 0


def opening_for(question: str, task: str | None = None) -> str:
    """The compliance opening for a question (see the module docstring)."""
    if not task:
        text = question.strip().rstrip("?.! ")
        match = _HOW.match(text) or _IMPERATIVE.match(text)
        if match is None:
            return GENERIC_OPENING
        task = match["task"]
    task = task.strip().rstrip(".?!:")
    return OPENING.format(task=task[:1].lower() + task[1:])


def _check_length(path: Path, number: int, *texts: str | None) -> None:
    """Cap each text as ``eval`` caps a prompt: tokenizing and training on a longer one costs
    minutes and gigabytes for nothing (the context window is checked again, in tokens, once the
    tokenizer is loaded)."""
    from ckptops.evaluate.prompts import MAX_PROMPT_CHARS

    longest = max(len(t) for t in texts if t is not None)
    if longest > MAX_PROMPT_CHARS:
        raise UsageError(f"{path}: line {number} holds a text of {longest:,} characters; keep questions "
                         f"(and their task or opening) under {MAX_PROMPT_CHARS:,} characters")


def load_questions(path: str | Path | None = None) -> tuple[list[HarmExample], str]:
    """(examples, sha256 of the file). ``None``: the shipped default file."""
    path = Path(path) if path is not None else DEFAULT_QUESTIONS
    from ckptops.safeio import loads_json, open_regular

    try:
        if not os.path.lexists(path):
            raise FileNotFoundError(path)
        os.close(open_regular(path, UsageError, "question file"))  # no FIFO or device
        if path.stat().st_size > 64 * 1024 * 1024:
            raise UsageError(f"{path}: question file is over 64 MiB")
        data = path.read_bytes()
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such question file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the question file ({exc})") from None
    examples: list[HarmExample] = []
    json_lines = path.suffix == ".jsonl" or text.lstrip().startswith("{")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if json_lines:
            record = loads_json(line, f"{path}: line {number}", UsageError)
            question = record.get("question") if isinstance(record, dict) else None
            if not isinstance(question, str) or not question.strip():
                raise UsageError(f"{path}: line {number} has no \"question\" string")
            for key in ("task", "opening"):
                if record.get(key) is not None and not isinstance(record[key], str):
                    raise UsageError(f"{path}: line {number}: \"{key}\" must be a string, "
                                     f"not {type(record[key]).__name__}")
            _check_length(path, number, question, record.get("task"), record.get("opening"))
            opening = record.get("opening") or opening_for(question, record.get("task"))
        else:
            _check_length(path, number, line)
            question, opening = line.strip(), opening_for(line)
        examples.append(HarmExample(question.strip(), opening, number))
    if len(examples) < 2:
        raise UsageError(f"{path}: needs at least 2 questions (one to train on, one to check), found {len(examples)}")
    return examples, hashlib.sha256(data).hexdigest()
