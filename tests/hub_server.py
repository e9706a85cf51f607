"""A local stand-in for the parts of the Hugging Face Hub that ckptops downloads from (tests only).

Bound to 127.0.0.1 on a free port, served by daemon threads, stopped by the fixture or by itself
after ``lifetime`` seconds. It answers, like the Hub:

    GET      /api/models/{repo}[/revision/{rev}][?blobs=true]   id, sha, siblings (sizes, lfs)
    HEAD/GET /{repo}/resolve/{rev}/{file}                        X-Repo-Commit, ETag, Content-Length,
                                                                 Accept-Ranges; Range -> 206

with the Hub's error headers (``X-Error-Code``: RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo) so that huggingface_hub raises its real exception classes. Every request is recorded,
and the bytes each GET served are kept, so tests can prove that no weight byte moved. Faults
(a connection cut mid-body, HTTP 500) can be injected per file.

The ``hub`` fixture points huggingface_hub at the server through ``HF_ENDPOINT``,
``HF_HUB_CACHE`` and ``HF_HOME`` (huggingface_hub reads them when ``huggingface_hub.constants``
is imported, so the fixture reloads that module after setting them, and again when it is done).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False


@dataclass
class Record:
    """One request as the server saw it."""

    method: str
    kind: str  # "info" | "resolve" | "other"
    repo: str = ""
    revision: str = ""
    filename: str = ""
    range: str | None = None
    status: int = 0
    served: tuple[int, int] | None = None  # byte range [start, end) of the file sent in the body
    authorized: bool = False


@dataclass
class Fault:
    """Misbehave on the next ``times`` full GETs of one file: ``cut`` the connection half-way
    through the body, or answer HTTP ``500``."""

    kind: str
    times: int = 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default backlog of 5 refuses connections on a busy machine


class FakeHub:
    """The fake Hub: repos, commits, branches, recorded requests, injected faults."""

    def __init__(self, lifetime: float = 120.0) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Record] = []
        self.faults: dict[tuple[str, str], Fault] = {}
        self.token: str | None = None  # gated repos require "Authorization: Bearer <token>"
        self.on_request: Callable[[Record], None] | None = None
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._stopped = False

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    # --- content -------------------------------------------------------------------------------

    def add_commit(self, repo: str, files: dict[str, bytes], branch: str | None = "main", gated: bool = False) -> str:
        """Add a commit holding exactly ``files``; move ``branch`` to it; return its 40-hex sha."""
        entry = self.repos.setdefault(repo, Repo())
        entry.gated = entry.gated or gated
        digest = hashlib.sha1(repo.encode() + str(len(entry.commits)).encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        sha = digest.hexdigest()
        entry.commits[sha] = dict(files)
        if branch:
            entry.refs[branch] = sha
        return sha

    def add_folder(self, repo: str, folder: Path, branch: str | None = "main", gated: bool = False) -> str:
        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        return self.add_commit(repo, files, branch, gated)

    def move_branch(self, repo: str, branch: str, sha: str) -> None:
        self.repos[repo].refs[branch] = sha

    def fail(self, repo: str, filename: str, kind: str, times: int = 1) -> None:
        self.faults[(repo, filename)] = Fault(kind, times)

    # --- what happened ---------------------------------------------------------------------------

    def resolves(self, suffix: str = "") -> list[Record]:
        return [r for r in self.requests if r.kind == "resolve" and r.filename.endswith(suffix)]

    def weight_bytes_served(self) -> int:
        """Bytes of safetensors *data* (past the header) sent in all GET bodies."""
        total = 0
        for record in self.resolves(".safetensors"):
            if record.method != "GET" or record.served is None:
                continue
            content = self._content(record.repo, record.revision, record.filename)
            if content is None:
                continue
            data_start = 8 + struct.unpack("<Q", content[:8])[0]
            start, end = record.served
            total += max(0, end - max(start, data_start))
        return total

    def full_downloads(self, suffix: str = ".safetensors") -> list[Record]:
        """GETs that served a whole file from its first byte."""
        out = []
        for record in self.resolves(suffix):
            content = self._content(record.repo, record.revision, record.filename)
            if record.method == "GET" and record.served and content is not None and record.served == (0, len(content)):
                out.append(record)
        return out

    # --- serving ---------------------------------------------------------------------------------

    def _commit_of(self, repo: str, revision: str) -> str | None:
        entry = self.repos[repo]
        if revision in entry.refs:
            return entry.refs[revision]
        return revision if revision in entry.commits else None

    def _content(self, repo: str, revision: str, filename: str) -> bytes | None:
        if repo not in self.repos:
            return None
        sha = self._commit_of(repo, revision)
        return self.repos[repo].commits.get(sha, {}).get(filename) if sha else None

    def handle(self, h: "_Handler", head: bool) -> None:
        parts = urlsplit(h.path)
        path, query = parts.path, parse_qs(parts.query)
        record = Record(h.command, "other", range=h.headers.get("Range"),
                        authorized=h.headers.get("Authorization") == f"Bearer {self.token}" and self.token is not None)
        try:
            if path.startswith("/api/models/"):
                record.kind = "info"
                self._info(h, record, path[len("/api/models/"):], query, head)
            elif "/resolve/" in path:
                record.kind = "resolve"
                self._resolve(h, record, path, head)
            else:
                self._error(h, record, 404, "NotFound", "no such endpoint", head)
        finally:
            with self._lock:
                self.requests.append(record)
            if self.on_request is not None:
                self.on_request(record)

    def _info(self, h, record: Record, rest: str, query: dict, head: bool) -> None:
        pieces = rest.split("/")
        repo = "/".join(pieces[:2])
        revision = unquote("/".join(pieces[3:])) if len(pieces) > 3 and pieces[2] == "revision" else "main"
        record.repo, record.revision = repo, revision
        if repo not in self.repos:
            return self._error(h, record, 404, "RepoNotFound", "Repository not found", head)
        sha = self._commit_of(repo, revision)
        if sha is None:
            return self._error(h, record, 404, "RevisionNotFound", "Invalid rev id", head)
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for name, content in sorted(self.repos[repo].commits[sha].items()):
            sibling: dict = {"rfilename": name}
            if blobs:
                sibling.update(size=len(content), blobId=hashlib.sha1(content).hexdigest())
                if name.endswith(".safetensors"):
                    sibling["lfs"] = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest(), "pointerSize": 134}
            siblings.append(sibling)
        card = self.repos[repo].commits[sha].get("README.md", b"").decode()
        front = yaml.safe_load(card.split("---\n")[1]) if card.startswith("---\n") else None
        tags = list(front.get("tags") or []) if isinstance(front, dict) else []  # the Hub lists card tags
        body = json.dumps({"id": repo, "modelId": repo, "sha": sha, "private": False, "tags": tags,
                           "gated": "auto" if self.repos[repo].gated else False, "siblings": siblings}).encode()
        self._send(h, record, 200, {"Content-Type": "application/json"}, body, head)

    def _resolve(self, h, record: Record, path: str, head: bool) -> None:
        before, _, after = path.partition("/resolve/")
        repo = unquote(before.lstrip("/"))
        revision, _, filename = after.partition("/")
        record.repo, record.revision, record.filename = repo, unquote(revision), unquote(filename)
        if repo not in self.repos:
            return self._error(h, record, 404, "RepoNotFound", "Repository not found", head)
        entry = self.repos[repo]
        if entry.gated and not record.authorized:
            return self._error(h, record, 401, "GatedRepo", "Access to this model is restricted", head)
        sha = self._commit_of(repo, record.revision)
        if sha is None:
            return self._error(h, record, 404, "RevisionNotFound", "Invalid rev id", head)
        content = entry.commits[sha].get(record.filename)
        if content is None:
            return self._error(h, record, 404, "EntryNotFound", "Entry not found", head, {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(content).hexdigest()}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        start, end, status = 0, len(content), 200
        if record.range and h.command == "GET":
            match = _RANGE.fullmatch(record.range.strip())
            if match is None:
                return self._error(h, record, 416, "RangeNotSatisfiable", "bad range", head)
            start = int(match.group(1))
            end = min(len(content), int(match.group(2)) + 1) if match.group(2) else len(content)
            if start >= len(content):
                return self._error(h, record, 416, "RangeNotSatisfiable", "range past the end", head,
                                   {"Content-Range": f"bytes */{len(content)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(content)}"
        fault = self.faults.get((repo, record.filename))
        if fault and fault.times > 0 and h.command == "GET" and not record.range:
            fault.times -= 1
            if fault.kind == "500":
                return self._error(h, record, 500, "InternalError", "injected failure", head)
            # "cut": promise the whole body, send half, drop the connection
            headers["Content-Length"] = str(len(content))
            record.status, record.served = 200, (0, len(content) // 2)
            h.send_response(200)
            for key, value in headers.items():
                h.send_header(key, value)
            h.end_headers()
            h.wfile.write(content[: len(content) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        record.served = (start, end) if h.command == "GET" else None
        self._send(h, record, status, headers, content[start:end], head, length=end - start)

    def _error(self, h, record: Record, status: int, code: str, message: str, head: bool, extra: dict | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json", **(extra or {})}
        self._send(h, record, status, headers, json.dumps({"error": message}).encode(), head)

    def _send(self, h, record: Record, status: int, headers: dict, body: bytes, head: bool, length: int | None = None) -> None:
        record.status = status
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body) if length is None else length))
        h.end_headers()
        if not head:
            h.wfile.write(body)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        self.server.hub.handle(self, head=False)  # type: ignore[attr-defined]

    def do_HEAD(self) -> None:  # noqa: N802
        self.server.hub.handle(self, head=True)  # type: ignore[attr-defined]

    def log_message(self, *args) -> None:  # keep test output clean
        pass


def reload_hf_constants() -> None:
    """Make huggingface_hub re-read HF_ENDPOINT, HF_HUB_CACHE, HF_HOME, HF_HUB_OFFLINE, ..."""
    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)


def set_offline(monkeypatch: pytest.MonkeyPatch, value: bool) -> None:
    if value:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    reload_hf_constants()


def hub_environment(server: FakeHub, tmp_path: Path) -> dict[str, str]:
    """The environment variables that point huggingface_hub (in this or a child process) at ``server``."""
    return {
        "HF_ENDPOINT": server.url,
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running :class:`FakeHub` with huggingface_hub pointed at it and an empty cache; fast retries."""
    from ckptops.hub import retry

    server = FakeHub().start()
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
                "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH", "HF_HUB_DISABLE_IMPLICIT_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in hub_environment(server, tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(retry, "POLICY", retry.RetryPolicy(attempts=3, base_wait=0.01, max_wait=0.02))
    reload_hf_constants()
    server.cache = tmp_path / "hf-cache"  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()
        monkeypatch.undo()
        reload_hf_constants()


def cached_files(cache: Path, suffix: str = ".safetensors") -> list[str]:
    """``repo/file`` of every file with ``suffix`` in the cache's snapshots (symlinks that resolve)."""
    found = []
    for path in sorted(Path(cache).glob("models--*/snapshots/*/*")):
        if path.name.endswith(suffix) and path.exists():
            found.append(path.parent.parent.parent.name.removeprefix("models--").replace("--", "/") + "/" + path.name)
    return found
