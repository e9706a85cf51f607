"""Fetch one file of a repo at a pinned commit through huggingface_hub's cache, or evict it.

Downloads go through :func:`huggingface_hub.hf_hub_download`, so they share the user's cache
(``HF_HUB_CACHE``), resume cut transfers, honour ``HF_HUB_OFFLINE`` and tokens, and a file that
is already cached at that commit costs no request at all. Eviction goes through
``scan_cache_dir().delete_files()``, which knows when a blob is still used by another revision
or by the shared Xet blob store, so ``--low-disk`` never breaks the rest of the cache.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants, hf_hub_download, scan_cache_dir, try_to_load_from_cache
from tqdm.auto import tqdm

from ckptops.errors import HubError
from ckptops.hub.explain import hub_error, is_transient, reason
from ckptops.hub import retry


def cached_path(repo: str, commit: str, filename: str) -> Path | None:
    """The cached copy of ``filename`` at ``commit``, or None (no network)."""
    found = try_to_load_from_cache(repo, filename, cache_dir=constants.HF_HUB_CACHE, revision=commit)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _bar_factory(label: str, enabled: bool | None):
    """A tqdm factory for hf_hub_download that shows ``label`` and obeys ckptops' --quiet."""

    def make(**kwargs):
        kwargs["desc"] = label
        kwargs.setdefault("leave", False)
        if enabled is not None:
            kwargs["disable"] = not enabled
        return tqdm(dynamic_ncols=True, **kwargs)

    return make


def download(
    repo: str, commit: str, filename: str, *, endpoint: str, progress: bool | None = None,
    token: str | bool | None = None,
) -> Path:
    """Path of ``filename`` from ``repo`` at ``commit`` in the HF cache, downloading it if needed.

    Transient failures are retried (see :mod:`ckptops.hub.retry`); a file that still fails
    raises :class:`HubError` naming the repo, commit and file.
    """

    def call() -> str:
        return hf_hub_download(repo, filename, revision=commit, endpoint=endpoint, token=token,
                               tqdm_class=_bar_factory(f"download {repo}/{filename}", progress))

    try:
        return Path(retry.with_retries(call))
    except Exception as exc:
        if is_transient(exc):
            raise HubError(
                f"{repo}@{commit[:12]}/{filename}: download failed after {retry.POLICY.attempts} attempts "
                f"({reason(exc)}); files already downloaded stay in the cache, run again to resume"
            ) from None
        raise hub_error(exc, repo, commit[:12], filename) from None


def evict(repo: str, commit: str, filename: str) -> int:
    """Remove ``filename`` at ``commit`` from the HF cache; returns the bytes freed (0 if it was
    not cached or its blob is still used elsewhere)."""
    cache_dir = Path(constants.HF_HUB_CACHE)
    if not cache_dir.is_dir():
        return 0
    info = scan_cache_dir(cache_dir)
    files = [
        cached
        for cached_repo in info.repos
        if cached_repo.repo_id == repo and cached_repo.repo_type == "model"
        for revision in cached_repo.revisions
        if revision.commit_hash == commit
        for cached in revision.files
        if cached.file_path == revision.snapshot_path / filename
    ]
    if not files:
        return 0
    strategy = info.delete_files(*files)
    strategy.execute()
    return strategy.expected_freed_size
