"""Read the safetensors header of a file on the Hub with two HTTP range requests.

``huggingface_hub.HfApi.parse_safetensors_file_metadata`` fetches the first 100 kB of a file,
which for a small model is already weight data, and does not return the file size that
:func:`ckptops.checkpoint.header.parse_header` needs to check offsets against. Here the first
request reads the 8-byte length prefix (and the file size from ``Content-Range``), the second
exactly the JSON header; no weight byte is transferred. The bytes are then validated by the same
code as a local file's.
"""

from __future__ import annotations

import re

from huggingface_hub import hf_hub_url
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

from ckptops.checkpoint.header import ShardHeader, header_length, parse_header
from ckptops.errors import HeaderError, HubError
from ckptops.hub.explain import hub_error
from ckptops.hub import retry

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
TIMEOUT = 30.0


def _read_range(url: str, start: int, length: int, headers: dict[str, str], where: str) -> tuple[bytes, int | None]:
    """Bytes ``[start, start + length)`` of ``url`` and the file's total size (None if unknown).

    A server that ignores ``Range`` and answers 200 is read only as far as needed."""
    request_headers = {**headers, "Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"}
    with http_stream_backoff(
        "GET", url, headers=request_headers, timeout=TIMEOUT,
        max_retries=max(retry.POLICY.attempts - 1, 0), base_wait_time=retry.POLICY.base_wait, max_wait_time=retry.POLICY.max_wait,
    ) as response:
        if response.status_code == 416:
            raise HeaderError(f"{where}: file is too short to be safetensors (truncated?)")
        hf_raise_for_status(response)
        total: int | None = None
        skip = 0
        if response.status_code == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if match is None or int(match.group(1)) != start:
                raise HubError(f"{where}: the server answered a range request with Content-Range "
                               f"{response.headers.get('Content-Range')!r}")
            total = int(match.group(3)) if match.group(3) != "*" else None
        else:
            skip = start
            if response.headers.get("Content-Length", "").isdigit():
                total = int(response.headers["Content-Length"])
        data = bytearray()
        for piece in response.iter_bytes():
            if skip:
                cut = min(skip, len(piece))
                piece, skip = piece[cut:], skip - cut
            data += piece
            if len(data) >= length:
                break
        return bytes(data[:length]), total


def fetch_header(
    repo: str, commit: str, filename: str, *, endpoint: str, where: str,
    size_hint: int | None = None, token: str | bool | None = None,
) -> ShardHeader:
    """Validated header of ``filename`` in ``repo`` at ``commit`` (reads 8 + header bytes only).

    ``size_hint`` is the size the repo listing gave; it must agree with the server's
    ``Content-Range``. Raises :class:`HeaderError` for a bad header, :class:`HubError` otherwise.
    """
    url = hf_hub_url(repo, filename, revision=commit, endpoint=endpoint)
    headers = build_hf_headers(token=token)
    try:
        prefix, total = _read_range(url, 0, 8, headers, where)
        size = total if total is not None else size_hint
        if size is None:
            raise HubError(f"{where}: the server did not say how large the file is")
        if size_hint is not None and size != size_hint:
            raise HubError(f"{where}: the repo listing says {size_hint} bytes but the file has {size}")
        n = header_length(prefix, size, where)  # checks the 100 MB cap before asking for n bytes
        raw, _ = _read_range(url, 8, n, headers, where)
    except (HeaderError, HubError):
        raise
    except Exception as exc:
        raise hub_error(exc, repo, commit[:12], filename) from None
    if len(raw) != n:
        raise HeaderError(f"{where}: file ended inside the header (truncated)")
    return parse_header(filename, raw, size, where)
