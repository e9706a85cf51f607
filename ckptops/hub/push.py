"""Publish an output folder to a Hub model repo in one call.

The repo is created if needed (private on request; an existing public repo is never silently
used for a push that asked for privacy), the branch is created if it is not ``main``, and the
folder goes up with :meth:`huggingface_hub.HfApi.upload_folder`: large files through the Hub's
large-file storage, resumable (re-running an interrupted push sends only what the Hub lacks).
Weight files on the branch that the folder does not hold are deleted in the same upload, so the
repo never mixes two models (transformers would load a stale ``model.safetensors`` first).

A symbolic link that leads out of the folder is never followed into the upload (the repo is
public by default, and ``notes.txt -> ~/.ssh/id_rsa`` would publish the key): it is left out with
a warning, as ``sanitize`` leaves such side files out; a link for a file the repo needs to load
(config, tokenizer) is refused. The checkpoint's own weight shards and index are the exception,
as everywhere in ckptops: their headers were validated, they are weights, and users link big
shards (leaving one out would also delete the repo's copy).

When the folder has ``ckptops.json`` (it came from ``ckptops sanitize``) and its README.md is
still the card ckptops wrote, the card is regenerated through ``huggingface_hub.ModelCard`` with
the repo id in the loading examples, and written back to the folder too, so the folder and the
repo stay identical. A README.md edited since (by hand, or by a recipe adding its ICV section) is
uploaded as it is.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ckptops import __version__
from ckptops.errors import CheckpointError, HubError, UsageError
from ckptops.hub.refs import require_repo_id
from ckptops.units import format_size

#: never uploaded: hidden files and folders (.cache, .git, editor files)
IGNORE_PATTERNS = [".*", "*/.*"]
#: remote weight files deleted when the folder does not hold them
DELETE_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
_BRANCH_RE = re.compile(r"[\w][\w.\-/]{0,199}")


@dataclass
class PushPlan:
    """What a push would do (``ckptops push --dry-run`` prints it; no network involved)."""

    folder: str
    repo_id: str
    private: bool
    branch: str | None
    commit_message: str
    files: list[tuple[str, int]] = field(default_factory=list)
    delete_patterns: list[str] = field(default_factory=lambda: list(DELETE_PATTERNS))
    card: str | None = None
    card_kept: bool = False
    custom_message: bool = False
    #: (path in the folder, where it leads): symbolic links out of the folder, never uploaded
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def ignore_patterns(self) -> list[str]:
        """``upload_folder``'s ignore patterns: hidden files, and each skipped link by its exact
        path (huggingface_hub matches them with fnmatch, so ``*?[`` in a name are escaped)."""
        return list(IGNORE_PATTERNS) + [glob.escape(path) for path, _ in self.skipped]

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["files"] = [{"path": p, "bytes": n} for p, n in self.files]
        out["total_bytes"] = self.total_bytes
        out["card"] = self.card is not None
        out["skipped"] = [{"path": p, "target": t} for p, t in self.skipped]
        del out["custom_message"]
        return out

    def format_text(self) -> str:
        lines = [
            f"would push {self.folder} to {self.repo_id} "
            f"({'private' if self.private else 'public if new'}, branch {self.branch or 'main'})",
            f"  commit message: {self.commit_message}",
        ]
        lines += [f"  {path:<44} {format_size(size)}" for path, size in self.files]
        lines.append(f"  {len(self.files)} file(s), {format_size(self.total_bytes)}")
        lines.append(f"  weight files on the branch that this folder lacks ({', '.join(self.delete_patterns)}) would be deleted")
        if self.card is not None:
            lines.append("  README.md regenerated from ckptops.json with this repo id")
        elif self.card_kept:
            lines.append("  README.md uploaded as it is (edited after ckptops wrote it)")
        return "\n".join(lines)

    def retry_command(self) -> str:
        parts = ["ckptops", "push", shlex.quote(self.folder), self.repo_id]
        if self.private:
            parts.append("--private")
        if self.branch:
            parts += ["--branch", shlex.quote(self.branch)]
        if self.custom_message:
            parts += ["--commit-message", shlex.quote(self.commit_message)]
        return " ".join(parts)


@dataclass
class PushResult:
    """Where the folder went."""

    repo_id: str
    url: str
    branch: str
    commit: str
    commit_url: str
    private: bool
    files: int
    bytes: int

    def to_dict(self) -> dict:
        return asdict(self)

    def format_text(self) -> str:
        return (f"pushed {self.files} file(s), {format_size(self.bytes)} to {self.url} "
                f"(branch {self.branch}, commit {self.commit[:12]})")


def _default_message(folder: Path) -> str:
    return f"Upload {folder.name} (Safety Arithmetic, ckptops {__version__})"


def _walk(folder: Path, weights: set[str], keep: set[str]) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """(files to upload with their sizes, links out of the folder left out with their targets).

    ``weights``: the checkpoint's shards and index, uploaded even through such a link; ``keep``:
    files replaced before the upload (a regenerated README.md), so where they lead does not
    matter. A link for a file the repo needs to load is refused."""
    from ckptops.checkpoint.side_files import NEEDED, allowed_area, outside_link

    area = allowed_area(folder)
    files, skipped = [], []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in relative.split("/")) or not path.is_file():
            continue
        target = None if relative in weights or relative in keep else outside_link(path, area)
        if target is None:
            files.append((relative, path.stat().st_size))
        elif relative in NEEDED:
            raise CheckpointError(f"{path}: is a symbolic link to {target}, outside the folder; the repo needs this "
                                  "file but ckptops uploads nothing from outside the folder (copy the file into the "
                                  "folder in place of the link)")
        else:
            skipped.append((relative, target))
    for relative, target in skipped:  # after the refusals: a refused push needs no warnings
        warnings.warn(f"{folder / relative}: is a symbolic link to {target}, outside the folder; it is not uploaded",
                      stacklevel=3)
    return files, skipped


def _regenerated_card(folder: Path, repo_id: str) -> tuple[str | None, bool]:
    """(new README text or None, whether an edited README is kept): regenerate only a card that
    is exactly what ckptops rendered from ``ckptops.json`` (for no repo or for some repo)."""
    from ckptops.checkpoint.card import render_card

    provenance_file = folder / "ckptops.json"
    if not provenance_file.is_file():
        return None, False
    try:
        provenance = json.loads(provenance_file.read_text(encoding="utf-8"))
        new = render_card(provenance, hub_repo=repo_id)
        readme = folder / "README.md"
        if not readme.is_file():
            return new, False
        current = readme.read_text(encoding="utf-8")
        earlier = {None, *re.findall(r"snapshot_download\('([^']+)'\)", current)}
        if any(current == render_card(provenance, hub_repo=repo) for repo in earlier):
            return new, False
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{provenance_file}: cannot build the model card from it ({exc})") from None
    return None, True


def plan_push(
    folder: str | os.PathLike, repo_id: str, *, private: bool = False, branch: str | None = None,
    commit_message: str | None = None,
) -> PushPlan:
    """Check ``folder`` and list what :func:`push` would upload, without touching the network.

    The folder must be a loadable checkpoint (headers and index are validated, no weights read).
    """
    from ckptops.checkpoint.resolve import INDEX_NAME, open_checkpoint

    require_repo_id(repo_id, "repo")
    if branch is not None and (not _BRANCH_RE.fullmatch(branch) or ".." in branch):
        raise UsageError(f"--branch {branch!r}: not a valid branch name")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{folder}: not a folder; push uploads a model folder (e.g. the --out of sanitize)")
    checkpoint = open_checkpoint(path)  # refuses folders without valid safetensors weights before anything is uploaded
    card, kept = _regenerated_card(path, repo_id)
    weights = set(checkpoint.shards) | ({INDEX_NAME} if checkpoint.has_index else set())
    files, skipped = _walk(path, weights, {"README.md"} if card is not None else set())
    if card is not None and "README.md" not in dict(files):
        files.append(("README.md", len(card.encode())))
    return PushPlan(str(folder), repo_id, private, branch, commit_message or _default_message(path), files,
                    card=card, card_kept=kept, custom_message=commit_message is not None, skipped=skipped)


def check_push_target(repo_id: str, token: str | None = None) -> None:
    """Fail early (before a long sanitize) when a push could not even start: a bad repo id or
    no token. No network."""
    from huggingface_hub import get_token

    require_repo_id(repo_id, "--push-to-hub")
    if not (token or get_token()):
        raise HubError(f"pushing to {repo_id} needs a token with write access: log in with `hf auth login` or set HF_TOKEN")


def make_api(token: str | None = None):
    """The ``HfApi`` pushes go through, on the endpoint in use (``HF_ENDPOINT``)."""
    from huggingface_hub import HfApi, constants

    return HfApi(endpoint=constants.ENDPOINT, token=token)


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name(f".{path.name}.ckptops-tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def push(
    folder: str | os.PathLike, repo_id: str, *, private: bool = False, branch: str | None = None,
    commit_message: str | None = None, token: str | None = None, api=None,
) -> PushResult:
    """Create ``repo_id`` if needed and upload ``folder`` to it (branch ``branch``, default main).

    ``token`` defaults to huggingface_hub's usual places; ``api`` defaults to :func:`make_api`. On failure the folder is left intact and the :class:`HubError` says how to retry.

    Example::

        from ckptops.hub.push import push
        result = push("wm-safe/", "me/wm-safe", private=True)
        print(result.url, result.commit)
    """
    from huggingface_hub.errors import HfHubHTTPError

    from ckptops.hub.explain import LOGIN_HINT, reason

    plan = plan_push(folder, repo_id, private=private, branch=branch, commit_message=commit_message)
    check_push_target(repo_id, token)
    api = api if api is not None else make_api(token)
    if plan.card is not None:
        _write_if_changed(Path(folder) / "README.md", plan.card)
    try:
        repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if private and getattr(api.model_info(repo_id), "private", None) is False:
            raise HubError(f"{repo_id}: exists and is public; refusing a push that asked for --private "
                           f"(make the repo private on the Hub, or push without --private)")
        if branch and branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=branch,
            commit_message=plan.commit_message, ignore_patterns=plan.ignore_patterns(),
            delete_patterns=list(plan.delete_patterns),
        )
    except HubError:
        raise
    except Exception as exc:
        hint = ""
        if isinstance(exc, HfHubHTTPError) and getattr(exc.response, "status_code", None) in (401, 403):
            hint = f"; {LOGIN_HINT} with a token that has write access to {repo_id}"
        raise HubError(
            f"push of {plan.folder} to {repo_id} failed ({reason(exc)}){hint}; the local folder is intact, "
            f"retry with: {plan.retry_command()} (files already uploaded are not sent again)"
        ) from None
    return PushResult(
        repo_id=repo_id, url=str(repo_url), branch=branch or "main", commit=getattr(commit, "oid", "") or "",
        commit_url=getattr(commit, "commit_url", "") or str(commit), private=private,
        files=len(plan.files), bytes=plan.total_bytes,
    )
