"""Recognise Hugging Face Hub references: ``org/name`` or ``org/name@revision``.

This module imports nothing from ``huggingface_hub``: :mod:`ckptops.checkpoint.resolve` asks it
whether a string that is not a local path looks like a repo id before any network code loads.
Only the two-part ``org/name`` form is accepted (not bare ``gpt2``), so that a mistyped local
folder name such as ``out`` is reported as a missing folder instead of a missing Hub repo.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ckptops.errors import UsageError

#: one part of a repo id, as the Hub allows it (letters, digits, ``-``, ``_``, ``.``; at most 96)
_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_REPO_RE = re.compile(rf"{_PART}/{_PART}")
#: branch, tag, commit hash or ``refs/pr/N``
_REVISION_RE = re.compile(r"[\w][\w.\-/]{0,254}")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubRef:
    """A model repo on the Hub and the revision the user asked for (None: the default branch)."""

    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo}@{self.revision}" if self.revision else self.repo


def is_repo_id(text: str) -> bool:
    """True for a syntactically valid ``org/name`` (no ``--`` or ``..``, as the Hub requires)."""
    return bool(_REPO_RE.fullmatch(text)) and "--" not in text and ".." not in text


def parse_hub_ref(text: str) -> HubRef | None:
    """``"org/name@rev"`` -> ``HubRef("org/name", "rev")``; None when ``text`` is not a Hub reference.

    Example::

        >>> parse_hub_ref("meta-llama/Llama-2-7b-chat-hf@main")
        HubRef(repo='meta-llama/Llama-2-7b-chat-hf', revision='main')
        >>> parse_hub_ref("./my-model") is None
        True
    """
    repo, at, revision = text.partition("@")
    if not is_repo_id(repo):
        return None
    if at:
        if not _REVISION_RE.fullmatch(revision) or ".." in revision or revision.endswith("/"):
            return None
        return HubRef(repo, revision)
    return HubRef(repo)


def require_repo_id(text: str, option: str) -> str:
    """Check a repo id given to ``option`` (e.g. ``--push-to-hub``) and return it."""
    if not is_repo_id(text):
        raise UsageError(f"{option} {text!r}: not a Hub repo id of the form 'org/name'")
    return text
