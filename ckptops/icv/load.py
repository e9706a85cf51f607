"""Load a model and tokenizer for ICV work, optionally in bounded RAM.

``--max-memory`` caps the model's resident weights: accelerate builds a device map that keeps
what fits in that budget on the CPU and marks the rest ``"disk"``. Disk-offloaded weights are
read back from the checkpoint's own safetensors files layer by layer during each forward pass
(cast to the compute dtype on the fly), so a model larger than RAM still yields its ICV -- more
slowly, since every forward pass re-reads the offloaded layers.

Only safetensors weights are loaded (never pickled ``.bin`` files), and the checkpoint's identity
(a sha256 over its weight files) is recorded so the ICV file names where it came from.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ckptops.errors import CheckpointError
from ckptops.hub.refs import is_repo_id
from ckptops.icv._extras import require_accelerate, require_transformers
from ckptops.icv.file import ICV_FILENAME
from ckptops.units import parse_size

_HASH_CHUNK = 8 << 20


@dataclass
class LoadedModel:
    """A model, its tokenizer and where they came from; ``close()`` removes the offload folder."""

    model: Any
    tokenizer: Any
    source: str
    source_sha256: str = ""
    offload_dir: str | None = None
    device_map: dict = field(default_factory=dict)
    _owns_offload_dir: bool = False

    def close(self) -> None:
        if self._owns_offload_dir and self.offload_dir:
            shutil.rmtree(self.offload_dir, ignore_errors=True)
        self.offload_dir = None

    def __enter__(self) -> "LoadedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def weight_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a local checkpoint folder (refusing pickle-only folders)."""
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if f.name != ICV_FILENAME]
    if not files:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {', '.join(pickled[:3])}: ckptops never loads pickled weights)" if pickled else ""
        raise CheckpointError(f"{folder}: no *.safetensors weight files{hint}")
    return files


def checkpoint_sha256(folder: str | os.PathLike, progress: bool | None = None) -> str:
    """sha256 over "<name> <sha256>" lines of the folder's weight files: the checkpoint's identity."""
    from tqdm.auto import tqdm

    files = weight_files(Path(folder))
    total = sum(f.stat().st_size for f in files)
    manifest = hashlib.sha256()
    with tqdm(total=total, desc="icv: hashing weights", unit="B", unit_scale=True, unit_divisor=1024,
              disable=(None if progress is None else not progress), leave=False) as bar:
        for file in files:
            digest = hashlib.sha256()
            with open(file, "rb") as handle:
                while chunk := handle.read(_HASH_CHUNK):
                    digest.update(chunk)
                    bar.update(len(chunk))
            manifest.update(f"{file.name} {digest.hexdigest()}\n".encode())
    return manifest.hexdigest()


@contextmanager
def _quiet_transformers(transformers: Any, quiet: bool) -> Iterator[None]:
    """Silence transformers' loading bars and notices while loading, then restore its settings."""
    if not quiet:
        yield
        return
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


from ckptops.checkpoint.resolve import looks_local, missing_local  # noqa: E402


def load_tokenizer(ref: str | os.PathLike) -> Any:
    transformers = require_transformers("loading a tokenizer")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(ref))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{ref}: cannot load its tokenizer ({_one_line(exc)})") from None


def load_model(
    ref: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    max_memory: str | int | None = None,
    offload_folder: str | os.PathLike | None = None,
    quiet: bool = False,
    hash_weights: bool = True,
    before_weights: Callable[[Any], None] | None = None,
) -> LoadedModel:
    """Load ``ref`` (a local folder or hub id) for ICV computation or generation.

    Args:
        dtype: the compute dtype (float32 by default, as the official code computes the ICV);
            ``"auto"`` keeps the checkpoint's dtype.
        max_memory: e.g. ``"4GiB"``: the most RAM the resident weights may take; the rest is
            offloaded to disk through accelerate. None loads everything into memory.
        offload_folder: where accelerate may write weights it cannot read straight from the
            checkpoint's safetensors (a temporary folder by default, removed by ``close()``).
        hash_weights: record the sha256 identity of a local folder's weight files.
        before_weights: called with the tokenizer, which loads first, before the weights load:
            checks that need only the tokenizer (demonstration lengths) then fail in seconds.
    """
    transformers = require_transformers("loading a model")
    budget = None if max_memory is None else parse_size(max_memory, "--max-memory")
    ref_text = str(ref)
    local = Path(ref_text)
    is_local = local.is_dir()
    if local.exists() and not is_local:
        raise CheckpointError(f"{ref_text}: not a model folder")
    if not is_local and (not is_repo_id(ref_text) or looks_local(ref_text)):
        raise missing_local(ref_text, what="model folder")
    if is_local:
        weight_files(local)
        if not (local / "config.json").is_file():
            raise CheckpointError(f"{ref_text}: no config.json (not a transformers checkpoint folder)")
    with _quiet_transformers(transformers, quiet):
        tokenizer = load_tokenizer(ref_text)  # seconds, where the weights may take minutes
    if before_weights is not None:
        before_weights(tokenizer)
    kwargs: dict[str, Any] = {"use_safetensors": True, "dtype": dtype}
    offload_dir: str | None = None
    owns = False
    if budget is not None:
        require_accelerate()
        if offload_folder is None:
            offload_dir, owns = tempfile.mkdtemp(prefix="ckptops-offload-"), True
        else:
            offload_dir = str(offload_folder)
            os.makedirs(offload_dir, exist_ok=True)
        kwargs.update(device_map="auto", max_memory={"cpu": budget}, offload_folder=offload_dir)
    try:
        with _quiet_transformers(transformers, quiet):
            model = transformers.AutoModelForCausalLM.from_pretrained(ref_text, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        if owns and offload_dir:
            shutil.rmtree(offload_dir, ignore_errors=True)
        raise CheckpointError(f"{ref_text}: cannot load the model with transformers ({_one_line(exc)})") from None
    model.eval()
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=ref_text,
        offload_dir=offload_dir,
        device_map=dict(getattr(model, "hf_device_map", None) or {}),
        _owns_offload_dir=owns,
    )
    try:
        if is_local and hash_weights:
            loaded.source_sha256 = checkpoint_sha256(local, progress=False if quiet else None)
    except BaseException:
        loaded.close()
        raise
    return loaded
