"""Open ``org/name[@revision]`` as a :class:`~ckptops.checkpoint.resolve.Checkpoint`, headers only.

The revision is resolved to a commit hash once, and every later request names that hash, so a
branch that moves while ckptops runs changes nothing. The file list comes from the repo info at
that commit; every safetensors header is then read with HTTP range requests (or from the cache),
so planning, and every mismatch error, happens before a weight byte is downloaded. Shards are
downloaded later, on first use, through huggingface_hub's cache.

With ``HF_HUB_OFFLINE=1`` (or when the Hub cannot be reached) the commit and the file list come
from the cache instead, if the revision was resolved and the files were downloaded before.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import OfflineModeIsEnabled
from huggingface_hub.file_download import repo_folder_name

from ckptops.checkpoint.header import ShardHeader, read_header
from ckptops.checkpoint.resolve import (
    INDEX_NAME,
    PICKLE_SUFFIXES,
    SINGLE_NAME,
    Checkpoint,
    Shard,
    _assemble,
    _read_index,
    _refuse_pickle,
    is_side_file,
)
from ckptops.errors import CheckpointError, HubError, IndexFileError
from ckptops.hub.download import cached_path, download, evict
from ckptops.hub.explain import hub_error, is_transient, offline
from ckptops.hub.headers import fetch_header
from ckptops.hub.refs import HubRef, parse_hub_ref
from ckptops.hub.retry import with_retries

_DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass
class Listing:
    """The files of a repo at one commit: name -> size (None if unknown) and known sha256s."""

    sizes: dict[str, int | None]
    sha256: dict[str, str] = field(default_factory=dict)
    from_cache: bool = False
    tags: list[str] = field(default_factory=list)


@dataclass
class HubCheckpoint(Checkpoint):
    """A checkpoint in a Hub repo, pinned to ``commit``. Shards download on first use; with
    ``--low-disk`` :meth:`release_shard` evicts the ones this run downloaded."""

    repo: str = ""
    revision: str | None = None
    commit: str = ""
    endpoint: str = ""
    side_names: list[str] = field(default_factory=list)
    #: the repo says it was sanitized already (``ckptops.json``, or the ``safety-arithmetic`` tag)
    marked_sanitized: bool = False
    #: shard files that were in the cache before this run: never evicted
    cached_before: set[str] = field(default_factory=set)
    #: shard files this run fetched
    fetched: set[str] = field(default_factory=set)
    #: shard files whose download failed (after retries): later reads fail at once, not retry again
    failed: dict[str, str] = field(default_factory=dict)
    token: str | bool | None = field(default=None, repr=False)
    #: bytes this run downloaded: whole shard files (each time one is fetched into the cache)
    #: and byte ranges (the one-read sample under ``--low-disk``)
    downloaded_bytes: int = 0

    def __post_init__(self) -> None:
        self.release = self.release_shard

    def where(self, filename: str) -> str:
        return f"{self.repo}@{self.commit[:12]}/{filename}"

    def fetch_shard(self, name: str) -> Path:
        """Download ``name`` (at the pinned commit) and check it is the file that was planned."""
        if name in self.failed:
            raise HubError(self.failed[name])
        try:
            path = download(self.repo, self.commit, name, endpoint=self.endpoint, progress=self.progress,
                            token=self.token)
        except HubError as exc:
            self.failed[name] = str(exc)
            raise
        planned = self.shards[name].header
        got = read_header(path, name)
        if got.file_size != planned.file_size or got.raw != planned.raw:
            raise HubError(f"{self.where(name)}: the downloaded file does not match the header read at preflight")
        if name not in self.cached_before:
            self.downloaded_bytes += got.file_size
        self.fetched.add(name)
        return path

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` of shard ``name`` by an HTTP range request, without
        downloading the file (the one-read sample under ``--low-disk``)."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        from ckptops.hub.headers import _read_range

        url = hf_hub_url(self.repo, name, revision=self.commit, endpoint=self.endpoint or None)
        try:
            data, _ = _read_range(url, offset, length, build_hf_headers(token=self.token), self.where(name))
        except HubError:
            raise
        except Exception as exc:  # noqa: BLE001 - network errors become one line naming the file
            raise HubError(f"{self.where(name)}: range request failed ({exc})") from None
        if len(data) != length:
            raise HubError(f"{self.where(name)}: range request returned {len(data)} of {length} bytes")
        self.downloaded_bytes += length
        return data

    def release_shard(self, name: str) -> None:
        """No remaining work reads ``name``: evict it from the cache if this run downloaded it."""
        shard = self.shards.get(name)
        if shard is None or name not in self.fetched or name in self.cached_before:
            return
        evict(self.repo, self.commit, name)
        self.fetched.discard(name)
        shard.path = None  # a later read (there should be none) downloads it again

    def side_file(self, name: str) -> Path:
        """One small file at the pinned commit, downloaded into the cache if needed."""
        return download(self.repo, self.commit, name, endpoint=self.endpoint, progress=False, token=self.token)

    def side_files(self) -> dict[str, Path]:
        """Config, tokenizer and generation files at the pinned commit (small; cached)."""
        return {name: self.side_file(name) for name in self.side_names}


def open_hub_checkpoint(ref: str | HubRef, *, token: str | bool | None = None) -> HubCheckpoint:
    """Resolve ``org/name[@revision]`` to a commit and read every safetensors header (no weights).

    ``token`` defaults to huggingface_hub's usual places (``HF_TOKEN``, ``hf auth login``).

    Example::

        ckpt = open_hub_checkpoint("meta-llama/Llama-2-7b-chat-hf@main")
        ckpt.identity  # {'type': 'hub', 'repo': ..., 'revision': 'main', 'commit': '...', 'files': [...]}
    """
    hub_ref = parse_hub_ref(ref) if isinstance(ref, str) else ref
    if hub_ref is None:
        raise HubError(f"{ref}: not a Hub reference of the form org/name[@revision]")
    repo, revision = hub_ref.repo, hub_ref.revision
    api = HfApi(endpoint=constants.ENDPOINT, token=token)
    commit = _resolve_commit(api, repo, revision)
    listing = _list_files(api, repo, revision, commit)
    label = f"{repo}@{commit[:12]}"
    weight_map, shard_names, has_index = _weight_files(api, repo, revision, commit, listing, token)
    cached = {name: cached_path(repo, commit, name) for name in shard_names}
    missing = [name for name in shard_names if name not in listing.sizes and cached[name] is None]
    if missing:
        if listing.from_cache:
            raise _not_cached(repo, revision, missing[0])
        raise IndexFileError(f"{label}/{INDEX_NAME}: names shard {missing[0]!r}, which is not in the repo")

    def header_of(name: str) -> ShardHeader:
        where = f"{label}/{name}"
        if cached[name] is not None:
            return read_header(cached[name], name)
        if listing.from_cache:
            raise _not_cached(repo, revision, name)
        return fetch_header(repo, commit, name, endpoint=api.endpoint, where=where,
                            size_hint=listing.sizes.get(name), token=token)

    with ThreadPoolExecutor(max_workers=min(8, len(shard_names))) as pool:
        headers = dict(zip(shard_names, pool.map(header_of, shard_names)))
    shards = {name: Shard(name, headers[name], cached[name]) for name in shard_names}
    assembled = _assemble(str(hub_ref), Path(label), shards, weight_map)
    identity = {"type": "hub", "repo": repo, "revision": revision or "main", "commit": commit,
                "files": sorted(shards)}
    if api.endpoint.rstrip("/") != _DEFAULT_ENDPOINT:
        identity["endpoint"] = api.endpoint
    known = {name: listing.sha256[name] for name in shards if name in listing.sha256}
    if known:
        identity["files_sha256"] = known
    checkpoint = HubCheckpoint(
        ref=str(hub_ref), root=None, shards=shards, tensors=assembled.tensors, identity=identity,
        has_index=has_index, repo=repo, revision=revision, commit=commit, endpoint=api.endpoint,
        side_names=sorted(n for n, size in listing.sizes.items() if is_side_file(n, size)),
        cached_before={name for name, path in cached.items() if path is not None}, token=token,
        marked_sanitized="ckptops.json" in listing.sizes or "safety-arithmetic" in listing.tags,
    )
    for name, shard in shards.items():
        shard.fetch = functools.partial(checkpoint.fetch_shard, name)
    return checkpoint


def _not_cached(repo: str, revision: str | None, name: str | None = None, subject: str = "this revision") -> HubError:
    how = "HF_HUB_OFFLINE is set" if offline() else f"{constants.ENDPOINT} cannot be reached"
    where = f"{repo}@{revision or 'main'}" + (f"/{name}" if name else "")
    subject = "this file is" if name else f"{subject} is"
    return HubError(
        f"{where}: {how} and {subject} not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}); run once online, or unset HF_HUB_OFFLINE"
    )


def _resolve_commit(api: HfApi, repo: str, revision: str | None) -> str:
    """The commit hash ``revision`` points to now (from the cache when offline)."""
    try:
        return with_retries(lambda: api.resolve_revision(
            repo, revision=revision, cache_dir=constants.HF_HUB_CACHE, local_files_only=offline())).resolved
    except Exception as exc:
        raise hub_error(exc, repo, revision or "main") from None


def _list_files(api: HfApi, repo: str, revision: str | None, commit: str) -> Listing:
    """Files at ``commit`` with sizes (and LFS sha256) from the Hub, or what the cache holds."""
    if not offline():
        try:
            info = with_retries(lambda: api.model_info(repo, revision=commit, files_metadata=True))
        except Exception as exc:
            if not (is_transient(exc) or isinstance(exc, OfflineModeIsEnabled)):
                raise hub_error(exc, repo, revision) from None
        else:
            if info.siblings is None:
                raise HubError(f"{repo}@{commit[:12]}: the Hub returned no file list")
            return Listing(
                {s.rfilename: s.size for s in info.siblings},
                {s.rfilename: s.lfs.sha256 for s in info.siblings if s.lfs is not None},
                tags=list(info.tags or []),
            )
    snapshot = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model") / "snapshots" / commit
    if not snapshot.is_dir():
        raise _not_cached(repo, revision)
    return Listing({p.name: p.stat().st_size for p in snapshot.iterdir() if p.is_file()}, from_cache=True)


def _weight_files(
    api: HfApi, repo: str, revision: str | None, commit: str, listing: Listing, token: str | bool | None,
) -> tuple[dict[str, str] | None, list[str], bool]:
    """(weight map or None, shard names, has index), chosen like a local folder's: the index,
    else ``model.safetensors``, else every top-level ``.safetensors``. Pickle-only repos are refused."""
    label = f"{repo}@{commit[:12]}"
    names = sorted(n for n in listing.sizes if "/" not in n)
    if INDEX_NAME in names:
        local = download(repo, commit, INDEX_NAME, endpoint=api.endpoint, progress=False, token=token)
        try:
            weight_map = _read_index(local, Path(label))
        except IndexFileError as exc:
            raise IndexFileError(str(exc).replace(str(local), f"{label}/{INDEX_NAME}")) from None
        return weight_map, sorted(set(weight_map.values())), True
    candidates = [n for n in names if n.endswith(".safetensors") and n != "icv.safetensors"]
    if SINGLE_NAME in candidates:
        return None, [SINGLE_NAME], False
    if candidates:
        return None, candidates, False
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES) or n.endswith(".bin.index.json")]
    if pickles:
        _refuse_pickle(f"{repo}@{revision or 'main'}", pickles)
    if listing.from_cache:
        raise _not_cached(repo, revision, subject="its .safetensors weights (removed by --low-disk?)")
    raise CheckpointError(f"{repo}@{revision or 'main'}: no .safetensors files in this repo")


__all__ = ["HubCheckpoint", "open_hub_checkpoint"]
