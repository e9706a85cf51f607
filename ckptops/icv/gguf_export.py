"""Export an ICV as a llama.cpp control vector (GGUF), and say exactly how to run it.

llama.cpp's format (the one vgel/repeng writes): ``general.architecture = "controlvector"``,
``controlvector.model_hint`` and ``controlvector.layer_count`` (informational: llama.cpp reads
only the tensors and checks neither), and one 1-D float32 tensor ``direction.{N}`` per layer.

**Layer numbering.** llama.cpp adds ``direction.N`` to the output of 0-based decoder layer N
(after that layer's MLP residual add; ``build_cvec(cur, il)`` in its Llama graph). In a Llama-type
block the MLP output is added straight to the residual stream, so adding u at layer N's output is
the same as adding u to layer N's MLP output: the **additive** rule. The export therefore writes
the additive rule's absolute vector ``u_N = s·m_N·v_N/‖v_N‖`` (strength folded in) as
``direction.N``, so llama.cpp at scale 1 computes what ``apply_icv(rule="additive")`` computes.
The official (gated, renormalised) and paper (renormalised) rules cannot run in llama.cpp; a file
with those rules is exported under the additive rule at the same α, and the report says so.

**Layer 0.** llama.cpp rejects ``direction.0`` and never steers layer 0, so layer 0's vector is
left out and llama.cpp then differs from the additive rule by exactly that layer. Compute the ICV
with ``--layers 1-…`` for an exact match, or bake it (``ckptops icv bake`` steers layer 0 too).

**Flags.** ``--control-vector-scaled FILE:SCALE`` (one argument, colon-separated; SCALE multiplies
every direction) and ``--control-vector-layer-range START END`` (inclusive, 0-based, as above).
"""

from __future__ import annotations

import os
import shlex
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckptops import _startup
from ckptops.errors import ICVError, OutputError, UsageError
from ckptops.icv._extras import require_gguf
from ckptops.icv.file import ICV, check_alpha, load_icv, shown
from ckptops.safeio import same_file

ARCHITECTURE = "controlvector"
#: llama.cpp architecture names that transformers model types convert to, accepted as hints too
LLAMA_CPP_ARCH = {"mistral": "llama"}


@dataclass(frozen=True)
class GGUFExport:
    """What was written: the file, the strength used, the layers exported and those dropped."""

    path: Path
    alpha: float
    strength: float
    layers: list[int]
    dropped_layers: list[int]
    model_hint: str
    source_rule: str

    @property
    def layer_range(self) -> tuple[int, int]:
        """``--control-vector-layer-range`` bounds (inclusive) covering every exported layer."""
        return min(self.layers), max(self.layers)

    def flags(self, scale: float = 1.0) -> list[str]:
        """The llama.cpp arguments that load this file at ``scale`` on exactly its layers."""
        start, end = self.layer_range
        return ["--control-vector-scaled", f"{self.path}:{scale:g}",
                "--control-vector-layer-range", str(start), str(end)]

    def commands(self, model: str = "MODEL.gguf") -> dict[str, str]:
        """Ready-to-run ``llama-server`` and ``llama-cli`` command lines."""
        flags = " ".join(shlex.quote(f) for f in self.flags())
        return {"llama-server": f"llama-server -m {shlex.quote(model)} {flags}",
                "llama-cli": f"llama-cli -m {shlex.quote(model)} {flags}"}


def check_model_hint(icv: ICV, model_hint: str | None) -> str:
    """The hint to record: the ICV's model type, or the one given if it names the same model.

    llama.cpp never checks the hint, so a wrong one would load silently on another model; an ICV
    only fits the model it was computed on, so a hint naming another type is refused."""
    recorded = icv.model_type
    if model_hint is None:
        if not recorded:
            raise ICVError("the ICV records no model type; pass --model-hint (e.g. llama)")
        return recorded
    given = model_hint.strip().lower()
    if recorded and given not in (recorded.lower(), LLAMA_CPP_ARCH.get(recorded.lower(), recorded.lower())):
        source = f" ({shown(icv.source, quoted=False)})" if icv.source else ""
        raise UsageError(
            f"--model-hint {model_hint!r} does not match the model the ICV was computed on: "
            f"{shown(recorded, quoted=False)}{source}, hidden size {icv.hidden_size}, {icv.num_layers} layers; "
            "an ICV only fits the model it was computed on"
        )
    return model_hint.strip()


def _check_target(target: Path, source: str | os.PathLike | None, overwrite: bool) -> Path:
    """Refuse an OUT that is the input ICV file (even with ``overwrite``: the export would destroy
    its own source), a folder, or an existing file without ``overwrite``; checked before the ICV is
    read, so that a refusal is the only thing printed."""
    if source is not None and same_file(target, source):
        raise OutputError(f"{target}: is the input ICV file; write the GGUF to another file, e.g. control.gguf")
    if target.is_dir():
        raise OutputError(f"{target}: is a folder, expected a file name such as control.gguf")
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise OutputError(f"{target}: already exists (use --overwrite to replace it)")
    return target


def export_gguf(icv_or_path: ICV | str | os.PathLike, out: str | os.PathLike, *, model_hint: str | None = None,
                alpha: float | None = None, overwrite: bool = False) -> GGUFExport:
    """Write ``out`` as a llama.cpp control vector holding the additive rule's u_N per layer (not 0).

    ``alpha`` defaults to the file's α; ``model_hint`` to its model type (a different type is
    refused). Loaded in llama.cpp at scale 1 on :meth:`GGUFExport.layer_range`, it computes what
    ``apply_icv(model, icv, rule="additive")`` computes, except on layer 0.

    Example::

        result = ckptops.icv.gguf_export.export_gguf("icv.safetensors", "safety.gguf")
        print(result.commands("model.gguf")["llama-server"])
    """
    target = _check_target(Path(out), None if isinstance(icv_or_path, ICV) else icv_or_path, overwrite)
    gguf = require_gguf()
    where = "ICV" if isinstance(icv_or_path, ICV) else str(icv_or_path)
    icv = icv_or_path if isinstance(icv_or_path, ICV) else load_icv(icv_or_path)
    hint = check_model_hint(icv, model_hint)
    source_rule = icv.rule
    try:
        additive = icv.with_application(alpha=None if alpha is None else check_alpha(alpha), rule="additive")
    except ICVError as exc:
        raise ICVError(f"{where}: {str(exc).removeprefix('ICV: ')}") from None
    dropped = [i for i in additive.layers if i == 0]
    layers = [i for i in additive.layers if i != 0]
    if dropped:
        warnings.warn("llama.cpp cannot steer decoder layer 0 (it rejects direction.0): layer 0's vector is left out, "
                      "so llama.cpp differs from the additive rule by that layer; compute with --layers 1-"
                      f"{icv.num_layers - 1} for an exact match, or bake the ICV into the weights (`ckptops icv bake`)",
                      stacklevel=2)
    if not layers:
        raise ICVError(f"{where}: nothing to export: llama.cpp cannot steer layer 0, and the ICV holds no other layer")
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
        writer.add_string(f"{ARCHITECTURE}.model_hint", hint)
        writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(layers))
        for index in layers:
            writer.add_tensor(f"direction.{index}", additive.additive_shift(index).numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, target)
        _startup.published(target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return GGUFExport(path=target, alpha=additive.alpha, strength=additive.strength, layers=layers,
                      dropped_layers=dropped, model_hint=hint, source_rule=source_rule)
