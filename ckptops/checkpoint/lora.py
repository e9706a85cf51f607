"""PEFT LoRA adapters as checkpoint inputs: a harm vector tau_H = scaling * B @ A, or a target
"base + adapter", without ever building a dense model in memory.

Why: most fine-tunes (and most harmful fine-tunes a user can afford) are LoRA adapters. An
adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) is resolved here into
the same tensor list as a model checkpoint - every tensor of the base, with the base's shapes -
whose values are produced on demand, chunk by chunk, by a *synthetic source* that the chunk
reader (:class:`ckptops.checkpoint.reader.Staging`) calls instead of reading file bytes. The
planner, the selection and the update never learn that a LoRA is involved.

Values, exactly:

- adapted module with weight W (shape out x in), A (r x in), B (out x r):
  ``delta = float32(B @ A) * scaling`` (``transpose`` first for ``fan_in_fan_out`` Conv1D
  modules), computed in float32 from float32 copies of A and B, a block of rows at a time, as
  PEFT's ``get_delta_weight`` does (the sum over the rank in order: see :func:`_product_rows`). ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
  ``use_rslora``), ``r`` and ``lora_alpha`` taken from ``rank_pattern`` / ``alpha_pattern`` with
  PEFT's own matching rule.
- as ``--harmful``: tau_H = delta for adapted tensors and exactly 0 for every other tensor; the
  base is not read at all (:func:`zero_view` stands in for it in the tau computation), so tau_H
  is delta itself, not ``(theta_b + delta) - theta_b`` with its cancellation error. Every scalar
  of the model still takes part in the global top-k, zeros included, as a dense theta_H would.
- as ``--target BASE+ADAPTER``: ``float32(theta_b) + delta`` in float32, *not* rounded to the
  base's dtype first; the sanitized output is then rounded once to the output dtype (the base's
  dtype by default). A tensor that is copied unchanged (excluded, outside ``--layers``) is that
  float32 sum rounded once (nearest even) to its dtype. Tensors the adapter does not touch are
  the base's bytes.

Refused with one line naming them (never skipped silently): DoRA, embedding / convolution
adapters, ``modules_to_save`` and trained biases, non-LoRA PEFT types, layer replication, rank 0,
modules that the base does not have or whose shapes do not match, pickle-only adapters.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ckptops.checkpoint.dtypes import FLOAT_CODES, itemsize, round_float32, widen_into
from ckptops.checkpoint.header import TensorInfo, read_header
from ckptops.checkpoint.resolve import PICKLE_SUFFIXES, Checkpoint, Shard, full_sha256, open_checkpoint
from ckptops.errors import CheckpointError, MismatchError
from ckptops.jsontypes import is_int, is_number

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: PEFT saves the wrapped model's module names under this prefix
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")


# --------------------------------------------------------------------------- finding adapters

def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def locate_adapter(ref: str) -> Path | None:
    """The local folder of a PEFT adapter named by ``ref`` (a folder, or a Hub repo whose files
    are then downloaded - adapters are small), or None when ``ref`` is not an adapter."""
    path = Path(ref).expanduser()
    if path.exists():
        return path if is_adapter_folder(path) else None
    from ckptops.hub.refs import parse_hub_ref

    hub_ref = parse_hub_ref(ref)
    if hub_ref is None:
        return None
    return _hub_adapter(hub_ref)


def _hub_adapter(hub_ref) -> Path | None:
    """Download ``adapter_config.json`` (None if the repo has none: an ordinary model) and the
    adapter's safetensors weights into the Hugging Face cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        config = hf_hub_download(hub_ref.repo, CONFIG_NAME, revision=hub_ref.revision)
    except EntryNotFoundError:
        return None
    except Exception:  # unreachable, private, unknown repo: let the model resolver explain it
        return None
    try:
        hf_hub_download(hub_ref.repo, WEIGHTS_NAME, revision=hub_ref.revision)
    except EntryNotFoundError:
        raise CheckpointError(
            f"{hub_ref}: adapter has no {WEIGHTS_NAME} (a .bin adapter is refused: ckptops never unpickles)"
        ) from None
    return Path(config).parent


def split_base_plus_adapter(ref: str) -> tuple[str, str] | None:
    """``BASE+ADAPTER`` -> (base, adapter), or None when ``ref`` is one model.

    A local path that exists is always one model, even with a '+' in its name. Otherwise the
    text is split at the first '+' whose right side is an adapter (a local adapter folder, or a
    Hub repo id - Hub ids cannot contain '+'; or a local path that does not exist, reported as
    a missing adapter) and whose left side exists or is a Hub repo id."""
    if "+" not in ref or Path(ref).expanduser().exists():
        return None
    from ckptops.hub.refs import parse_hub_ref

    def names_model(text: str) -> bool:
        return bool(text) and (Path(text).expanduser().exists() or parse_hub_ref(text) is not None)

    from ckptops.checkpoint.resolve import looks_local

    for i, char in enumerate(ref):
        right = ref[i + 1:]
        # a missing local right side still splits, so that the error names the missing adapter
        if char == "+" and names_model(ref[:i]) and (names_model(right) or (right and looks_local(right))):
            return ref[:i], right
    return None


# --------------------------------------------------------------------------- reading adapters

@dataclass
class LoraModule:
    """One adapted linear layer: the base tensor it changes and its float32 factors."""

    tensor: str  # the base tensor (``<module>.weight``)
    a: np.ndarray  # float32 (r, in)
    b: np.ndarray  # float32 (out, r)
    scaling: float
    fan_in_fan_out: bool
    #: applied after B @ A; 1.0 when ``scaling`` was folded into ``b`` (see :func:`_fold_scaling`)
    post_scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(left, right), C-contiguous float32, with the weight = left @ right: (B, A), or for a
        ``fan_in_fan_out`` (Conv1D) module, whose weight is (B @ A)^T, (A^T, B^T)."""
        if self.fan_in_fan_out:
            return np.ascontiguousarray(self.a.T), np.ascontiguousarray(self.b.T)
        return np.ascontiguousarray(self.b), np.ascontiguousarray(self.a)


@dataclass
class Adapter:
    """A validated adapter: its folder, config, weight file and modules keyed by base tensor."""

    folder: Path
    config: dict
    weights: Path
    modules: dict[str, LoraModule]

    def identity(self, ref: str) -> dict:
        files = {n: full_sha256(self.folder / n) for n in (CONFIG_NAME, WEIGHTS_NAME)}
        import hashlib

        combined = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()
        ranks = sorted({m.rank for m in self.modules.values()})
        return {"type": "lora-adapter", "ref": ref, "path": str(self.folder.resolve()), "hash_kind": "sha256",
                "sha256": combined, "files_sha256": files, "modules": len(self.modules), "ranks": ranks,
                "lora_alpha": self.config.get("lora_alpha"), "use_rslora": bool(self.config.get("use_rslora")),
                "base_model_name_or_path": self.config.get("base_model_name_or_path")}


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: the first pattern key ``k`` with ``(.*\\.)?(k)$`` matching the
    module name, else the default."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _refuse(where: str, what: str) -> CheckpointError:
    return CheckpointError(f"{where}: {what}")


def _check_config(folder: Path, config: dict) -> None:
    where = str(folder / CONFIG_NAME)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise _refuse(where, f"peft_type {peft_type} is not supported (only LoRA adapters are)")
    if config.get("use_dora"):
        raise _refuse(where, "DoRA adapters (use_dora) are not supported: their weight is not base + B @ A")
    if config.get("layer_replication"):
        raise _refuse(where, "layer_replication is not supported")
    if config.get("modules_to_save"):
        raise _refuse(where, f"modules_to_save {config['modules_to_save']} is not supported "
                             "(those modules are whole trained copies, not a low-rank delta)")
    if config.get("bias", "none") not in ("none", None):
        raise _refuse(where, f"bias={config['bias']!r} is not supported (trained biases are not a low-rank delta)")
    for key, what in (("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
                      ("trainable_token_indices", "trainable token embeddings (trainable_token_indices)"),
                      ("use_qalora", "QALoRA (use_qalora)"), ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
                      ("lora_bias", "trained LoRA biases (lora_bias)")):
        if config.get(key):
            raise _refuse(where, f"{what} is not supported: the weight is not base + scaling * B @ A")
    if config.get("target_parameters"):
        raise _refuse(where, "target_parameters (LoRA on raw parameters) is not supported")
    r = config.get("r", 8)
    if not _is_rank(r):
        raise _refuse(where, f"r (the LoRA rank) must be a positive integer, not {_shown(r)}")
    alpha = config.get("lora_alpha", 8)
    if not _is_alpha(alpha):
        raise _refuse(where, f"lora_alpha must be a finite number, not {_shown(alpha)}")
    _check_patterns(where, config, "rank_pattern", _is_rank, "a positive integer")
    _check_patterns(where, config, "alpha_pattern", _is_alpha, "a finite number")


def _is_rank(value) -> bool:
    return is_int(value) and value >= 1  # (not JSON ``true``, which Python reads as 1)


def _is_alpha(value) -> bool:
    return is_number(value) and math.isfinite(value)


def _check_patterns(where: str, config: dict, key: str, valid, what: str) -> None:
    """``rank_pattern`` / ``alpha_pattern``: an object of regular expression -> value. Each key is
    compiled here the way PEFT's ``get_pattern_key`` uses it, so that a bad one is refused in one
    line before :func:`_pattern_value` would raise ``re.error`` mid-read."""
    patterns = config.get(key)
    if patterns is None:
        return
    if not isinstance(patterns, dict):
        raise _refuse(where, f"{key} must be an object of pattern -> {what}, not {_shown(patterns)}")
    for pattern, value in patterns.items():
        try:
            re.compile(rf"(.*\.)?({pattern})$")
        except (re.error, RecursionError, OverflowError) as exc:
            reason = getattr(exc, "msg", None) or type(exc).__name__  # (its position would be in PEFT's wrapper)
            raise _refuse(where, f"{key} key {pattern[:100]!r} is not a valid regular expression ({reason})") from None
        if not valid(value):
            raise _refuse(where, f"{key} key {pattern[:100]!r}: the value must be {what}, not {_shown(value)}")


def _shown(value) -> str:
    """A config value as the JSON it was written as (``true``, not Python's ``True``), cut short."""
    text = json.dumps(value, allow_nan=True, default=str)
    return text if len(text) <= 100 else text[:97] + "..."


def read_adapter(folder: Path) -> Adapter:
    """Read and validate an adapter folder; every refusal is one line naming the file."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    from ckptops.safeio import load_json_file

    config = load_json_file(config_path, 16 * 1024 * 1024, CheckpointError, "adapter config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: not a JSON object")
    _check_config(folder, config)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise CheckpointError(f"{folder}: adapter weights are pickle only ({', '.join(pickles)}); ckptops never "
                                  "unpickles untrusted files - save the adapter with safetensors")
        raise CheckpointError(f"{folder}: adapter has no {WEIGHTS_NAME}")
    header = read_header(weights)  # validated like any checkpoint header before loading
    raw = _load_float32(weights, header)
    pairs: dict[str, dict[str, object]] = {}
    unsupported: list[str] = []
    for key in (i.name for i in header.tensors):
        match = _LORA_KEY.match(key)
        if match is None or not key.startswith(PREFIX):
            unsupported.append(key)
            continue
        pairs.setdefault(match["module"][len(PREFIX):], {})[match["part"]] = raw[key]
    if unsupported:
        kinds = _describe_unsupported(unsupported)
        raise CheckpointError(f"{weights}: unsupported adapter tensors ({kinds}): {', '.join(unsupported[:4])}")
    if not pairs:
        raise CheckpointError(f"{weights}: holds no LoRA tensors")
    modules: dict[str, LoraModule] = {}
    fan = bool(config.get("fan_in_fan_out", False))
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"A", "B"}:
            raise CheckpointError(f"{weights}: module {module} has lora_{'A' if 'A' in parts else 'B'} only")
        a, b = parts["A"], parts["B"]
        if a is None or b is None:
            raise CheckpointError(f"{weights}: module {module}: lora_A and lora_B must be float tensors")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{weights}: module {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not form B @ A")
        rank = int(a.shape[0])
        if rank == 0:
            raise CheckpointError(f"{weights}: module {module} has rank 0")
        r = _pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
        if r != rank:
            raise CheckpointError(f"{weights}: module {module} has rank {rank} but {CONFIG_NAME} says r={r}")
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        if not all(bool(np.isfinite(t).all()) for t in (a, b)):
            raise CheckpointError(f"{weights}: module {module} holds NaN or Inf")
        modules[f"{module}.weight"] = _fold_scaling(LoraModule(f"{module}.weight", a, b, float(scaling), fan,
                                                               float(scaling)))
    return Adapter(folder, config, weights, modules)


def _load_float32(weights: Path, header) -> dict[str, np.ndarray | None]:
    """Every tensor of the adapter file as a C-contiguous float32 numpy array (None for a
    non-float tensor), converted exactly as torch's ``.float()`` would: float16/bfloat16
    widened, float64 rounded to nearest. Read with numpy, not ``safetensors.torch``: the
    adapter path needs no torch (its import alone costs over a second)."""

    tensors: dict[str, np.ndarray | None] = {}
    with open(weights, "rb") as file:
        for info in header.tensors:
            if info.dtype not in FLOAT_CODES:
                tensors[info.name] = None
                continue
            file.seek(info.offset)
            data = file.read(info.nbytes)
            if len(data) != info.nbytes:
                raise CheckpointError(f"{weights}: tensor {info.name} is cut short")
            values = np.empty(info.numel, dtype=np.float32)
            widen_into(data, info.dtype, values)
            tensors[info.name] = values.reshape(info.shape)
    return tensors


def _fold_scaling(module: LoraModule) -> LoraModule:
    """Multiply B by the scaling once, when that gives the same bits as scaling each product.

    Multiplying by a power of two >= 1 is exact and commutes with every float32 rounding of the
    product as long as nothing overflows (the bound below is far from it), so (s * B) @ A equals
    fl(B @ A) * s bit for bit and saves a pass over every chunk (a third of the product's cost).
    Other scalings are applied after the product, as PEFT does."""
    s = module.scaling
    mantissa, _ = math.frexp(s)
    if s < 1.0 or mantissa != 0.5:
        return module
    bound = float(np.abs(module.b).max(initial=0.0)) * s * float(np.abs(module.a).max(initial=0.0)) * module.rank
    if not bound < 1e30:
        return module
    module.b = module.b * np.float32(s)
    module.post_scale = 1.0
    return module


def _describe_unsupported(keys: list[str]) -> str:
    kinds = []
    for key in keys:
        kind = ("DoRA magnitude" if "lora_magnitude_vector" in key else
                "embedding adapter" if "lora_embedding_" in key else
                "modules_to_save" if "modules_to_save" in key else
                "bias" if key.endswith(".bias") else "not LoRA A/B")
        if kind not in kinds:
            kinds.append(kind)
    return ", ".join(kinds)


def check_against_base(adapter: Adapter, base: Checkpoint) -> None:
    """Every adapted module must be a float 2-D tensor of the base with the product's shape."""
    problems = []
    for name, module in adapter.modules.items():
        info = base.tensors.get(name)
        out_rows, in_cols = int(module.b.shape[0]), int(module.a.shape[1])
        shape = (in_cols, out_rows) if module.fan_in_fan_out else (out_rows, in_cols)
        if info is None:
            problems.append(f"{name} is not a tensor of the base")
        elif info.dtype not in FLOAT_CODES or tuple(info.shape) != shape:
            problems.append(f"{name} is {list(shape)} (B @ A) but {list(info.shape)} {info.dtype} in the base")
    if problems:
        more = f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
        raise MismatchError(f"{adapter.weights}: adapter does not fit base {base.ref}: {'; '.join(problems[:4])}{more}")
    _warn_on_base_name(adapter, base)


def _warn_on_base_name(adapter: Adapter, base: Checkpoint) -> None:
    named = adapter.config.get("base_model_name_or_path")
    if not named:
        return
    stem = str(named).rstrip("/").split("/")[-1].split("@")[0].lower()
    given = [base.ref.rstrip("/").split("/")[-1].split("@")[0].lower()]
    if base.root is not None and (base.root / "config.json").is_file():
        try:
            given.append(str(json.loads((base.root / "config.json").read_text()).get("_name_or_path", "")).rstrip("/").split("/")[-1].lower())
        except (OSError, ValueError):
            pass
    if stem not in given:
        warnings.warn(f"{adapter.folder}: adapter was made for {named!r}, used with base {base.ref!r} "
                      "(the shapes match, so it runs)", stacklevel=2)


# --------------------------------------------------------------------------- synthetic sources

class _Scratch(threading.local):
    buffer = None
    zeros = None
    delta = None
    values = None


class ZeroSource:
    """Every tensor reads as +0.0: the base in the tau computation when theta_H is an adapter
    (tau = delta - 0 = delta exactly)."""

    _zeros = _Scratch()

    def read_f32(self, stage, files, info: TensorInfo, start: int, stop: int, out) -> None:
        out[: stop - start] = 0

    def read_native(self, stage, files, info, start, stop, out):
        """A view of one per-thread float32 zero block, never written (the fused kernels only read
        their inputs): no memset of 4 bytes per value on every chunk."""
        n = stop - start
        zeros = ZeroSource._zeros.zeros
        if zeros is None or zeros.size < n:
            zeros = ZeroSource._zeros.zeros = np.zeros(max(n, 1), dtype=np.float32)
            zeros.flags.writeable = False
        return memoryview(zeros[:n].view(np.uint8)), False

    def read_raw(self, stage, files, info, start, stop) -> memoryview:
        n = (stop - start) * itemsize(info.dtype)
        stage.raw_np[:n] = 0
        return stage.view[:n]


class LoraSource(ZeroSource):
    """Values of adapted tensors from their factors, a block of rows at a time.

    ``base`` None: the tensor *is* the delta (theta_H as tau); tensors the adapter does not touch
    read as zero. ``base`` given: ``float32(base) + delta``; untouched tensors are the base's own
    reads (its bytes, same fast path).

    The product: the fused extension's ``lora_rows`` loop (each element summed over the rank in
    order, no fused multiply-add: the same bits on every machine and thread count), or numpy's
    matmul when the extension is not built. Neither needs torch."""

    def __init__(self, modules: dict[str, LoraModule], base: Checkpoint | None = None) -> None:
        self.modules = modules
        self.base = base
        self._factors = {name: module.factors() for name, module in modules.items()}
        self._scratch = _Scratch()

    def _delta_into(self, name: str, shape: tuple[int, ...], start: int, stop: int, out: np.ndarray) -> None:
        """``out[:stop-start]`` (float32 numpy) = elements [start, stop) of scaling * (B @ A)."""
        module = self.modules[name]
        left, right = self._factors[name]
        cols = shape[1]
        r0, r1 = start // cols, -(-stop // cols)
        n = stop - start
        if start == r0 * cols and stop == r1 * cols:
            _product_rows(left, right, r0, r1, out[:n], module.post_scale)
            return
        need = (r1 - r0) * cols
        scratch = self._scratch.buffer
        if scratch is None or scratch.size < need:
            scratch = self._scratch.buffer = np.empty(need, dtype=np.float32)
        _product_rows(left, right, r0, r1, scratch[:need], module.post_scale)
        out[:n] = scratch[start - r0 * cols: stop - r0 * cols]

    def _values(self, stage, files, info: TensorInfo, start: int, stop: int, out) -> None:
        target = out if isinstance(out, np.ndarray) else out.numpy()  # a torch buffer (tune's path)
        if self.base is None:
            self._delta_into(info.name, info.shape, start, stop, target)
            return
        stage.read_f32(files, self.base, info, start, stop, target)
        n = stop - start
        delta = self._scratch.delta
        if delta is None or delta.size < n:
            delta = self._scratch.delta = np.empty(n, dtype=np.float32)
        self._delta_into(info.name, info.shape, start, stop, delta)
        np.add(target[:n], delta[:n], out=target[:n])

    def read_f32(self, stage, files, info, start, stop, out) -> None:
        if info.name in self.modules:
            self._values(stage, files, info, start, stop, out)
        elif self.base is not None:
            stage.read_f32(files, self.base, info, start, stop, out)
        else:
            out[: stop - start] = 0

    def read_native(self, stage, files, info, start, stop, out):
        if info.name in self.modules:
            from ckptops.checkpoint.reader import byte_view

            self._values(stage, files, info, start, stop, out)
            return byte_view(out[: stop - start]), False
        if self.base is not None:
            return stage.read_native(files, self.base, info, start, stop, out)
        return super().read_native(stage, files, info, start, stop, out)  # untouched: the zero block

    def read_raw(self, stage, files, info, start, stop) -> memoryview:
        if info.name not in self.modules:
            if self.base is not None:
                return stage.read_raw(files, self.base, info, start, stop)
            return super().read_raw(stage, files, info, start, stop)

        n = stop - start
        values = self._scratch.values
        if values is None or values.size < n:
            values = self._scratch.values = np.empty(n, dtype=np.float32)
        self._values(stage, files, info, start, stop, values)
        size = itemsize(info.dtype)
        round_float32(values[:n], info.dtype, stage.raw_np[: n * size])  # one rounding, nearest even
        return stage.view[: n * size]


def _product_rows(left: np.ndarray, right: np.ndarray, r0: int, r1: int, out: np.ndarray, post_scale: float) -> None:
    """``out`` (flat float32, (r1 - r0) * cols) = rows [r0, r1) of left @ right, times post_scale."""
    from ckptops.hdr import fused

    rows, rank, cols = r1 - r0, right.shape[0], right.shape[1]
    if fused.built():
        fused.lora_rows(left[r0:r1], right, rows, rank, cols, out, post_scale)
        return
    block = out.reshape(rows, cols)
    np.matmul(left[r0:r1], right, out=block)
    if post_scale != 1.0:
        np.multiply(block, np.float32(post_scale), out=block)


# --------------------------------------------------------------------------- checkpoints

def zero_view(base: Checkpoint) -> Checkpoint:
    """``base`` as the tau computation sees it when theta_H is an adapter: same tensors, all zero."""
    return replace(base, synthetic=ZeroSource())


def harmful_checkpoint(adapter: Adapter, base: Checkpoint, ref: str) -> Checkpoint:
    """theta_H given as an adapter: every base tensor, float32, valued tau_H (see module doc)."""
    check_against_base(adapter, base)
    shard = Shard(WEIGHTS_NAME, read_header(adapter.weights), adapter.weights)
    tensors = {}
    for name, info in base.tensors.items():
        if info.dtype in FLOAT_CODES:
            info = TensorInfo(name, "F32", info.shape, WEIGHTS_NAME, 0, info.numel * 4)
        else:  # integer buffers keep their kind (the plan copies them from the target)
            info = TensorInfo(name, info.dtype, info.shape, WEIGHTS_NAME, 0, info.nbytes)
        tensors[name] = info
    return Checkpoint(ref, adapter.folder, {WEIGHTS_NAME: shard}, tensors, adapter.identity(ref),
                      synthetic=LoraSource(adapter.modules))


def merged_checkpoint(base: Checkpoint, adapter: Adapter, ref: str) -> Checkpoint:
    """``BASE+ADAPTER`` as a target: the base's tensor list (dtypes, shapes, sharding), adapted
    tensors valued float32(base) + delta (see module doc)."""
    check_against_base(adapter, base)
    from ckptops.checkpoint.card import base_model_id

    # the card names the base as the model this one derives from, and the adapter by its hash
    identity = {"type": "base+lora-adapter", "ref": ref, "hash_kind": "adapter sha256",
                "hub_id": base_model_id(base.identity, base.ref),
                "base": dict(base.identity, ref=base.ref), "adapter": adapter.identity(str(adapter.folder))}
    identity["sha256"] = identity["adapter"]["sha256"]
    if base.identity.get("type") == "local":
        from ckptops.checkpoint.resolve import fingerprint

        identity["base"]["sampled_sha256"] = fingerprint(base)
    return replace(base, ref=ref, identity=identity, synthetic=LoraSource(adapter.modules, base))


@dataclass
class Inputs:
    """What sanitize reads: ``base`` as given (edit-area diffs, identity) and the three
    checkpoints of the tau/update computation (``tau_base`` is a zero view when theta_H is an
    adapter)."""

    base: Checkpoint
    tau_base: Checkpoint
    harmful: Checkpoint
    target: Checkpoint


def open_model(ref: str | os.PathLike, base: Checkpoint | None = None) -> Checkpoint:
    """A model reference that may be ``BASE+ADAPTER`` (the base opened here) - the target's
    spelling. Plain models go to :func:`open_checkpoint`."""
    text = os.fspath(ref)
    parts = split_base_plus_adapter(text)
    if parts is None:
        return open_checkpoint(text)
    base_ref, adapter_ref = parts
    from ckptops.checkpoint.resolve import looks_local, missing_local

    if not Path(adapter_ref).expanduser().exists() and looks_local(adapter_ref):  # a typo: never the Hub
        raise missing_local(adapter_ref, CheckpointError, "adapter folder")
    folder = locate_adapter(adapter_ref)
    if folder is None:
        raise CheckpointError(f"{adapter_ref}: not a PEFT adapter (no {CONFIG_NAME}) - in BASE+ADAPTER the part after '+' must be an adapter")
    return merged_checkpoint(open_checkpoint(base_ref), read_adapter(folder), text)


def open_inputs(base: str | os.PathLike, harmful: str | os.PathLike, target: str | os.PathLike) -> Inputs:
    """Resolve sanitize's three inputs; ``harmful`` may be an adapter folder, ``target`` may be
    ``BASE+ADAPTER``."""
    base_ckpt = open_checkpoint(base)
    folder = locate_adapter(os.fspath(harmful))
    if folder is not None:
        harmful_ckpt = harmful_checkpoint(read_adapter(folder), base_ckpt, os.fspath(harmful))
        tau_base = zero_view(base_ckpt)
    else:
        harmful_ckpt, tau_base = open_checkpoint(harmful), base_ckpt
    return Inputs(base_ckpt, tau_base, harmful_ckpt, open_model(target))


__all__ = ["Adapter", "Inputs", "LoraModule", "open_inputs", "open_model", "read_adapter", "locate_adapter",
           "split_base_plus_adapter", "harmful_checkpoint", "merged_checkpoint", "zero_view"]
