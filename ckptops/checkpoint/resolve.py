"""Turn what the user typed (a folder, a ``.safetensors`` file) into a :class:`Checkpoint`.

A checkpoint is known from its headers alone: the shard files, and for every tensor its shard,
byte range, dtype and shape. Nothing here reads tensor data, so planning can report every problem
before work starts. Pickle checkpoints (``.bin``/``.pt``/...) are refused, never opened.

Remote checkpoints (Hugging Face Hub references) plug in through :data:`REMOTE_RESOLVERS`: a
resolver returns a :class:`Checkpoint` whose shards carry a ``fetch`` callable that downloads the
file on first use.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ckptops.checkpoint.header import ShardHeader, TensorInfo, read_header
from ckptops.errors import CheckpointError, IndexFileError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: an index lists tensor names and file names: even a 100k-tensor model's is a few MB
MAX_INDEX_BYTES = 64 * 1024 * 1024


@dataclass
class Shard:
    """One safetensors file of a checkpoint: its validated header and how to get its bytes."""

    name: str
    header: ShardHeader
    path: Path | None = None
    fetch: Callable[[], Path] | None = None

    def local_path(self) -> Path:
        if self.path is None:
            if self.fetch is None:
                raise CheckpointError(f"{self.name}: no local copy and no way to fetch it")
            self.path = Path(self.fetch())
        return self.path


@dataclass
class Checkpoint:
    """A model's tensors as listed by its safetensors headers (no data loaded).

    ``tensors`` is ordered by shard, then by offset, which is the order reads are cheapest in.
    ``identity`` describes the input for reports and model cards (path or repo and commit).
    """

    ref: str
    root: Path | None
    shards: dict[str, Shard]
    tensors: dict[str, TensorInfo]
    identity: dict = field(default_factory=dict)
    has_index: bool = False
    #: called when no remaining work needs a shard (``--low-disk`` uses it to free the disk)
    release: Callable[[str], None] | None = None
    #: progress bars for shards fetched on first use (None: only when stderr is a terminal)
    progress: bool | None = None
    #: values computed instead of read from the shards (a LoRA adapter, see
    #: :mod:`ckptops.checkpoint.lora`): ``read_f32``/``read_native``/``read_raw`` like
    #: :class:`~ckptops.checkpoint.reader.Staging`'s, taking the staging buffer first
    synthetic: object | None = None

    @property
    def total_bytes(self) -> int:
        return sum(s.header.file_size for s in self.shards.values())

    def shard_path(self, name: str) -> Path:
        return self.shards[name].local_path()

    def side_files(self) -> dict[str, Path]:
        """Small non-weight files (config, tokenizer, generation config, ...) by name, without
        those that link out of the folder (see :mod:`ckptops.checkpoint.side_files`)."""
        if self.root is None:
            return {}
        from ckptops.checkpoint.side_files import collect_side_files

        return collect_side_files(self.root)


def is_side_file(name: str, size: int | None) -> bool:
    """Whether a top-level file of a checkpoint is copied into an output folder: everything small
    (config, tokenizer, generation config, ...) that is not weights, an index or the model card.
    The same rule serves local folders and Hub repos."""
    skip_suffixes = (".safetensors", ".gguf", ".msgpack", ".h5", ".onnx", ".lock") + PICKLE_SUFFIXES
    if name.startswith(".") or "/" in name or name.endswith(skip_suffixes) or name.endswith(".index.json"):
        return False
    return name != "README.md" and (size is None or size <= 64 * 1024 * 1024)


#: functions ``ref -> Checkpoint | None`` tried, in order, when ``ref`` is not a path
REMOTE_RESOLVERS: list[Callable[[str], "Checkpoint | None"]] = []


def _hub_resolver(ref: str) -> "Checkpoint | None":
    """``org/name[@revision]`` on the Hugging Face Hub. huggingface_hub is imported only when a
    reference looks like a repo id, so the engine imports (and runs on folders) without it."""
    from ckptops.hub.refs import parse_hub_ref

    hub_ref = parse_hub_ref(ref)
    if hub_ref is None:
        return None
    from ckptops.hub.resolve import open_hub_checkpoint

    return open_hub_checkpoint(hub_ref)


REMOTE_RESOLVERS.append(_hub_resolver)


def looks_local(text: str) -> bool:
    """Whether a model reference that does not exist on disk can only mean a local path, so that
    a typo is reported at once as a missing folder instead of waiting on the Hub.

    Local: anything absolute or starting with ``.``/``~``, with a backslash, more than one ``/``,
    a file suffix, no ``/`` at all (Hub ids are ``org/name``), or whose first part is an existing
    local folder (``demo/targt`` when ``demo/`` is here). Everything else is a Hub repo id."""
    from ckptops.hub.refs import parse_hub_ref

    if not text or text.startswith(("/", ".", "~")) or "\\" in text or os.path.isabs(text):
        return True
    if text.endswith((".safetensors", ".json", ".gguf") + PICKLE_SUFFIXES):
        return True
    first = text.split("/", 1)[0]
    if os.path.isdir(first) or os.path.lexists(first):
        return True
    return parse_hub_ref(text) is None


def missing_local(text: str, error: type[CheckpointError] = CheckpointError, what: str = "file or folder") -> CheckpointError:
    """``<ref>: no such folder`` with the nearest existing names beside it, if any."""
    import difflib

    path = Path(text).expanduser()
    parent = path.parent if str(path.parent) else Path(".")
    hint = ""
    if parent.is_dir():
        try:
            names = [p.name for p in parent.iterdir()]
        except OSError:
            names = []
        close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
        if close:
            hint = "; did you mean " + " or ".join(str(parent / c) for c in close) + "?"
    elif str(parent) not in ("", "."):
        hint = f" (nor is {parent} a folder)"
    return error(f"{text}: no such {what}{hint}")


def open_checkpoint(ref: str | os.PathLike) -> Checkpoint:
    """Resolve a local folder, a single ``.safetensors`` file, or (with the Hub extension) a repo id."""
    text = os.fspath(ref)
    path = Path(text).expanduser()
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"{text}: is a symbolic link to {os.readlink(path)!r}, which does not exist")
    if path.exists():
        return _open_local(path, text)
    if looks_local(text):
        raise missing_local(text)
    for resolver in REMOTE_RESOLVERS:
        checkpoint = resolver(text)
        if checkpoint is not None:
            return checkpoint
    raise CheckpointError(f"{text}: no such file or folder")


def _refuse_pickle(where: str, names: list[str]) -> None:
    raise CheckpointError(
        f"{where}: holds only pickle checkpoints ({', '.join(names[:3])}); ckptops never unpickles "
        "untrusted files - convert them to safetensors first"
    )


def _open_local(path: Path, ref: str) -> Checkpoint:
    if path.is_file():
        if path.name.endswith(PICKLE_SUFFIXES):
            _refuse_pickle(str(path), [path.name])
        if not path.name.endswith(".safetensors"):
            raise CheckpointError(f"{path}: not a .safetensors file or a model folder")
        header = read_header(path)
        shards = {path.name: Shard(path.name, header, path)}
        return _assemble(ref, path.parent, shards, None)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a file or folder")

    names = sorted(p.name for p in path.iterdir() if p.is_file() or p.is_symlink())
    index_path = path / INDEX_NAME
    if index_path.is_symlink() and not index_path.exists():
        raise IndexFileError(f"{index_path}: is a symbolic link to {os.readlink(index_path)!r}, which does not exist; "
                             "fix the link or remove it")
    if index_path.exists():
        weight_map = _read_index(index_path, path)
        shard_names = sorted(set(weight_map.values()))
    else:
        weight_map = None
        candidates = [n for n in names if n.endswith(".safetensors") and n != "icv.safetensors"]
        if SINGLE_NAME in candidates:
            candidates = [SINGLE_NAME]
        if not candidates:
            pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES) or n.endswith(".bin.index.json")]
            if pickles:
                _refuse_pickle(str(path), pickles)
            if not names:
                raise CheckpointError(f"{path}: folder is empty")
            raise CheckpointError(f"{path}: no .safetensors files in this folder")
        shard_names = candidates
    shards: dict[str, Shard] = {}
    for name in shard_names:
        file = path / name
        if file.is_symlink() and not file.exists():
            raise IndexFileError(f"{index_path}: shard {name!r} is a symbolic link to {os.readlink(file)!r}, "
                                 "which does not exist")
        if not file.exists():
            raise IndexFileError(f"{index_path}: names shard {name!r}, which does not exist")
        shards[name] = Shard(name, read_header(file, name), file)
    return _assemble(ref, path, shards, weight_map)


def _read_index(index_path: Path, root: Path) -> dict[str, str]:
    from ckptops.safeio import load_json_file

    obj = load_json_file(index_path, MAX_INDEX_BYTES, IndexFileError, "index file")
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise IndexFileError(f"{index_path}: has no 'weight_map' object")
    for tensor, file in weight_map.items():
        if not tensor:
            raise IndexFileError(f"{index_path}: weight_map has an empty tensor name")
        if not isinstance(file, str) or not file:
            raise IndexFileError(f"{index_path}: tensor {tensor!r} maps to {file!r}, not a file name")
        normalized = posixpath.normpath(file.replace("\\", "/"))
        if (
            "\\" in file
            or normalized.startswith("/")
            or normalized == ".."
            or normalized.startswith("../")
            or os.path.isabs(file)
            or ":" in file
        ):
            raise IndexFileError(f"{index_path}: shard name {file!r} (tensor {tensor!r}) leaves the model folder")
        if not file.endswith(".safetensors"):
            raise IndexFileError(f"{index_path}: shard name {file!r} (tensor {tensor!r}) is not a .safetensors file")
    return weight_map


def _assemble(ref: str, root: Path, shards: dict[str, Shard], weight_map: dict[str, str] | None) -> Checkpoint:
    """Collect tensors across shards, checking them against the index when there is one."""
    tensors: dict[str, TensorInfo] = {}
    for shard in shards.values():
        for info in shard.header.tensors:
            if info.name in tensors:
                raise CheckpointError(
                    f"{root}: tensor {info.name!r} appears in both {tensors[info.name].shard} and {shard.name}"
                )
            if weight_map is not None and weight_map.get(info.name) != shard.name:
                where = weight_map.get(info.name)
                raise IndexFileError(
                    f"{root / INDEX_NAME}: tensor {info.name!r} is in {shard.name} but the index "
                    + (f"says {where}" if where else "does not list it")
                )
            tensors[info.name] = info
    if weight_map is not None:
        missing = [t for t in weight_map if t not in tensors]
        if missing:
            raise IndexFileError(
                f"{root / INDEX_NAME}: lists {len(missing)} tensor(s) that its shards do not hold: {', '.join(missing[:5])}"
            )
    if not tensors:
        raise CheckpointError(f"{root}: the safetensors files hold no tensors")
    identity = {"type": "local", "path": str(Path(root).resolve()), "files": sorted(shards)}
    return Checkpoint(ref, Path(root), shards, tensors, identity, weight_map is not None)


def fingerprint(checkpoint: Checkpoint, samples: int = 16, sample_bytes: int = 1 << 20) -> str:
    """A cheap identity for a local checkpoint: sha256 over each shard's name, size, header and
    ``samples`` evenly spaced ``sample_bytes`` windows of its data.

    Two different fine-tunes of one architecture share headers, so the header alone is no identity;
    hashing every byte (1-2 GB/s) would cost more than the whole sanitize. Use
    :func:`full_sha256` when an exact content hash is wanted.
    """
    digest = hashlib.sha256()
    for shard in checkpoint.shards.values():
        header = shard.header
        digest.update(f"{shard.name}\0{header.file_size}\0".encode())
        digest.update(header.raw)
        size = header.file_size - header.data_start
        if size <= 0:
            continue
        with open(shard.local_path(), "rb") as f:
            step = max(size // samples, 1)
            for i in range(samples):
                start = header.data_start + min(i * step, max(size - sample_bytes, 0))
                digest.update(os.pread(f.fileno(), sample_bytes, start))
    return digest.hexdigest()


def full_sha256(path: Path, chunk: int = 8 << 20) -> str:
    """sha256 of a whole file, streamed."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()
