"""Turn ``huggingface_hub`` / ``httpx`` exceptions into one-line :class:`~ckptops.errors.HubError`s.

``huggingface_hub`` raises precise classes (repo not found, gated, revision not found, entry not
found, offline) whose messages span many lines and mention URLs; users need one line that names
the repo, the revision and the file, and says what to do. The token is never part of a message:
every text taken from an exception goes through :func:`redact`.
"""

from __future__ import annotations

import os

import httpx2
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)

from ckptops.errors import HubError

LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"


def endpoint() -> str:
    """The Hub endpoint in use (``HF_ENDPOINT``), read at call time."""
    return constants.ENDPOINT


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (read at call time, as huggingface_hub does)."""
    return constants.is_offline_mode()


def redact(text: str) -> str:
    """Remove any token that may appear in ``text`` (HF_TOKEN, the saved token) and squash it to
    one line of at most 200 characters."""
    try:
        from huggingface_hub import get_token

        secrets = [t for t in (get_token(), os.environ.get("HF_TOKEN")) if t]
    except Exception:  # a broken token file must not hide the real error
        secrets = [t for t in (os.environ.get("HF_TOKEN"),) if t]
    for secret in secrets:
        text = text.replace(secret, "***")
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def reason(exc: BaseException) -> str:
    if isinstance(exc, HfHubHTTPError):
        status = _status(exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return redact(f"HTTP {status}: {first}" if status and str(status) not in first else first)
    return redact(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def is_transient(exc: BaseException) -> bool:
    """A failure worth retrying: connection problems, timeouts, cut transfers, 5xx/429/408, a
    download whose size came out wrong. Not: missing repos/files, auth, offline mode."""
    if isinstance(exc, (OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError)):
        return False
    if isinstance(exc, HfHubHTTPError):
        return _status(exc) in (408, 429) or (_status(exc) or 0) >= 500
    if isinstance(exc, httpx2.TransportError):
        return not isinstance(exc, httpx2.ProxyError)
    if isinstance(exc, (LocalEntryNotFoundError, RevisionResolutionError)):
        # raised when the Hub could not be asked and nothing is cached: retry when the
        # underlying cause was the network, not offline mode
        cause = exc.__cause__ or exc.__context__
        return cause is not None and not offline() and is_transient(cause)
    if type(exc) is OSError and exc.errno is None:
        return True  # huggingface_hub's "Consistency check failed" (size mismatch after a cut)
    return False


def hub_error(exc: BaseException, repo: str, revision: str | None = None, file: str | None = None) -> HubError:
    """The one-line error for ``exc`` raised while reading ``repo`` (at ``revision``, ``file``)."""
    rev = f"@{revision}" if revision else ""
    where = f"{repo}{rev}" + (f": {file}" if file else "")
    if isinstance(exc, GatedRepoError):
        return HubError(f"{where}: {repo} is a gated repo; accept its conditions at {endpoint()}/{repo} and {LOGIN_HINT}")
    if isinstance(exc, RepositoryNotFoundError) or (isinstance(exc, HfHubHTTPError) and _status(exc) == 401):
        return HubError(
            f"{repo}: no such local folder, and no model repo {repo!r} on {endpoint()} "
            f"(for a private or gated repo, {LOGIN_HINT})"
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{repo}: revision {revision!r} not found (use a branch, tag or commit hash of {repo})")
    if isinstance(exc, RemoteEntryNotFoundError):
        return HubError(f"{where}: file not found in the repo at this revision")
    if isinstance(exc, HfHubHTTPError) and _status(exc) == 403:
        return HubError(f"{where}: access denied ({reason(exc)}); {LOGIN_HINT} with a token that can read {repo}")
    if isinstance(exc, (OfflineModeIsEnabled, RevisionResolutionError, LocalEntryNotFoundError)) and offline():
        return HubError(
            f"{where}: HF_HUB_OFFLINE is set and this is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); run once online, or unset HF_HUB_OFFLINE"
        )
    return HubError(f"{where}: cannot reach {endpoint()} ({reason(exc)})")
