"""The ICV file: one float32 vector per steered decoder layer plus the metadata to apply it safely.

Layout, a safetensors file of a few kilobytes::

    icv.layers.{i}   float32[hidden_size]   0-based decoder-layer index i, stored toward *safe*
    __metadata__     format, format_version, rule, site, alpha, scale_factor, strength,
                     sign_convention, method, positions, num_demos, demos_sha256, model_type,
                     hidden_size, num_layers, source, source_sha256, created_by,
                     mlp_output_norms (JSON {layer: typical MLP-output norm}), ...

Format version 1 holds the official and paper rules; version 2 adds the additive rule, which
needs ``mlp_output_norms`` (its strength is relative to them). Files are written as version 1
whenever they do not use the additive rule, so older ckptops releases keep reading them, and
both versions load here.

The file records how it is meant to be applied (rule, α and the scale factor) so that whoever
loads it later gets the same behaviour without remembering the flags. Loading validates
everything a hand-edited or foreign file could get wrong, and :meth:`ICV.check_fits` refuses a
model whose hidden size or layer count differs, naming both.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ckptops import _startup
from ckptops.errors import ICVError, OutputError, UsageError

FORMAT_NAME = "ckptops-icv"
FORMAT_VERSION = 2
FORMAT_VERSION_WITHOUT_ADDITIVE = 1
READABLE_VERSIONS = ("1", "2")
TENSOR_PREFIX = "icv.layers."
SIGN_CONVENTION = "toward_safe: stored = -(direction of h(unsafe) - h(safe))"
_TENSOR_NAME = re.compile(r"icv\.layers\.(0|[1-9][0-9]{0,5})")
#: the most characters of a file's own value an error echoes: enough to recognise it, while a
#: hostile file (a 5000-digit hidden_size) cannot turn the one-line error into a page
SHOWN_CHARS = 40
#: integer metadata (hidden size, layer and demonstration counts) above this is not a real model's
MAX_META_INT = 2**31 - 1

#: the ICV file name inside a model folder: loaders apply it, and skip it when listing weights
ICV_FILENAME = "icv.safetensors"


def shown(value: object, quoted: bool = True) -> str:
    """``repr(value)`` (or ``str`` when not ``quoted``) cut to :data:`SHOWN_CHARS` characters, for
    echoing a file's contents in an error."""
    text = repr(value) if quoted else str(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


@dataclass(frozen=True)
class Rule:
    """How a rule applies the vector, and its defaults."""

    name: str
    site: str  # "mlp_output": each decoder layer's MLP block output; "residual": each decoder layer's output
    scale_factor: float  # effective strength s = scale_factor * alpha
    default_alpha: float
    summary: str


RULES: dict[str, Rule] = {
    "official": Rule(
        "official", "mlp_output", 0.1, 0.12,
        "x <- normalize(x/|x| + s*(1+relu(cos(x,-v)))*v/|v|)*|x| on each MLP block output, s = 0.1*alpha",
    ),
    "paper": Rule(
        "paper", "residual", 1.0, 0.12,
        "h <- (h + alpha*v) * |h|/|h + alpha*v| on each decoder layer output",
    ),
    "additive": Rule(
        "additive", "mlp_output", 0.1, 0.12,
        "x <- x + s*m_l*v/|v| on each MLP block output (m_l: typical MLP-output norm), s = 0.1*alpha; "
        "a bias on down_proj, and what llama.cpp control vectors do",
    ),
}
NORMS_KEY = "mlp_output_norms"
METHODS = ("pc1+mean", "pc1")
POSITIONS = ("last4", "last")


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise UsageError(f"unknown ICV rule {name!r}; choose one of: {', '.join(RULES)}") from None


@dataclass(frozen=True, eq=False)
class ICV:
    """A safety in-context vector: per-layer float32 vectors (toward safe) and how to apply them.

    ``vectors`` maps the 0-based decoder-layer index to a 1-D float32 CPU tensor of
    ``hidden_size`` values. Only the listed layers are steered.
    """

    vectors: dict[int, torch.Tensor]
    hidden_size: int
    num_layers: int
    rule: str = "official"
    alpha: float = 0.12
    scale_factor: float = 0.1
    method: str = "pc1+mean"
    positions: str = "last4"
    num_demos: int = 0
    demos_sha256: str = ""
    model_type: str = ""
    source: str = ""
    source_sha256: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    #: typical (median per token) norm of each layer's MLP block output on the demonstrations,
    #: measured at compute time; the additive rule's strength is relative to it
    mlp_norms: dict[int, float] = field(default_factory=dict)

    # -- derived -------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    @property
    def site(self) -> str:
        return get_rule(self.rule).site

    @property
    def strength(self) -> float:
        """The effective strength s = scale_factor * alpha (0.012 for the official defaults)."""
        return self.scale_factor * self.alpha

    def with_application(self, alpha: float | None = None, rule: str | None = None) -> "ICV":
        """The same vectors applied differently: a new α and/or rule (the rule's own scale factor)."""
        new_rule = self.rule if rule is None else get_rule(rule).name
        scale = self.scale_factor if new_rule == self.rule else get_rule(new_rule).scale_factor
        new_alpha = self.alpha if alpha is None else check_alpha(alpha)
        changed = replace(self, rule=new_rule, scale_factor=scale, alpha=new_alpha)
        if new_rule == "additive":
            changed.require_norms()
        return changed

    def require_norms(self, where: str = "ICV") -> None:
        """The additive rule needs every steered layer's typical MLP-output norm; older files lack them."""
        missing = [i for i in self.layers if i not in self.mlp_norms]
        if missing:
            raise ICVError(
                f"{where}: holds no typical MLP-output norm for layer(s) {missing[:5]} (written by an older ckptops), "
                "which the additive rule's strength is relative to; recompute it with "
                "`ckptops icv compute --rule additive`"
            )

    def additive_shift(self, index: int) -> torch.Tensor:
        """The absolute vector u_l = s * m_l * v_l/|v_l| the additive rule adds to layer ``index``'s
        MLP output (float32; computed in float64). It is also the baked ``down_proj.bias`` and the
        GGUF ``direction.{index}``."""
        self.require_norms()
        vector = self.vectors[index].to(torch.float64)
        norm = float(torch.linalg.vector_norm(vector))
        if norm == 0.0:
            return torch.zeros_like(self.vectors[index])
        return (vector * (self.strength * self.mlp_norms[index] / norm)).to(torch.float32)

    # -- validation ----------------------------------------------------------------------
    def check_fits(self, hidden_size: int, num_layers: int, model_name: str = "the model") -> None:
        """Refuse a model the vectors were not computed for, naming both shapes."""
        if hidden_size != self.hidden_size or num_layers != self.num_layers:
            raise ICVError(
                f"ICV does not fit {model_name}: the ICV is for hidden size {self.hidden_size} and "
                f"{self.num_layers} layers, the model has hidden size {hidden_size} and {num_layers} layers"
            )

    # -- file I/O ------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        rule = get_rule(self.rule)
        meta = dict(self.extra)
        version = FORMAT_VERSION if rule.name == "additive" else FORMAT_VERSION_WITHOUT_ADDITIVE
        if self.mlp_norms:
            meta[NORMS_KEY] = json.dumps({str(i): float(self.mlp_norms[i]) for i in sorted(self.mlp_norms)})
        meta.update({
            "format": FORMAT_NAME,
            "format_version": str(version),
            "rule": rule.name,
            "site": rule.site,
            "alpha": repr(float(self.alpha)),
            "scale_factor": repr(float(self.scale_factor)),
            "strength": repr(float(self.strength)),
            "sign_convention": SIGN_CONVENTION,
            "method": self.method,
            "positions": self.positions,
            "num_demos": str(int(self.num_demos)),
            "demos_sha256": self.demos_sha256,
            "model_type": self.model_type,
            "hidden_size": str(int(self.hidden_size)),
            "num_layers": str(int(self.num_layers)),
            "source": self.source,
            "source_sha256": self.source_sha256,
        })
        meta.setdefault("created_by", _created_by())
        return meta

    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write the file atomically (temporary file + rename); returns the path."""
        _validate_vectors(self.vectors, self.hidden_size, self.num_layers, "ICV")
        if self.rule == "additive":
            self.require_norms()
        target = Path(path)
        if target.exists() and not overwrite:
            raise OutputError(f"{target}: already exists (use --overwrite to replace it)")
        if target.is_dir():
            raise OutputError(f"{target}: is a folder, expected a file name such as icv.safetensors")
        tensors = {f"{TENSOR_PREFIX}{i}": self.vectors[i].detach().to("cpu", torch.float32).contiguous() for i in self.layers}
        parent = target.parent if str(target.parent) else Path(".")
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
        try:
            _write_sorted(tmp, tensors, self.metadata())
            os.replace(tmp, target)
            _startup.published(target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target


def _write_sorted(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file with its metadata in sorted key order, tensors in the given order:
    safetensors' own ``save_file`` orders metadata as a hash map does (differently each run),
    which made two identical ICVs differ byte for byte."""
    from ckptops.checkpoint.writer import OutShard, OutTensor, header_bytes

    shard = OutShard(Path(path).name, [OutTensor(name, "F32", tuple(t.shape)) for name, t in tensors.items()])
    head, _ = header_bytes(shard, dict(sorted(metadata.items())))
    with open(path, "wb") as f:
        f.write(head)
        for tensor in tensors.values():
            f.write(tensor.numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


def _created_by() -> str:
    from ckptops import __version__

    return f"ckptops {__version__}"


#: alpha above this many times the rule's default (0.12 for both rules) draws a warning: the
#: steering term then rivals the hidden state itself and outputs usually degrade
SANE_ALPHA_FACTOR = 10.0


def check_strength(icv: "ICV", where: str = "ICV") -> float:
    """Refuse an ICV whose effective strength s = scale_factor * alpha, or s times a layer vector
    (computed in float32 by the hooks), is not finite (every logit would be NaN); warn when alpha
    is beyond :data:`SANE_ALPHA_FACTOR` times the rule's default. Returns s."""
    import warnings

    strength = icv.scale_factor * icv.alpha
    if not math.isfinite(strength):
        raise ICVError(f"{where}: effective strength scale_factor x alpha = {icv.scale_factor!r} x {icv.alpha!r} "
                       "is not a finite number; use an alpha like the default 0.12")
    for index, vector in icv.vectors.items():
        if not bool(torch.isfinite(vector.float() * strength).all()):
            raise ICVError(f"{where}: alpha {icv.alpha!r} times the layer-{index} vector overflows float32; "
                           "use an alpha like the default 0.12")
    sane = SANE_ALPHA_FACTOR * get_rule(icv.rule).default_alpha
    if icv.alpha > sane:
        warnings.warn(f"{where}: alpha {icv.alpha:g} is over {sane:g} ({SANE_ALPHA_FACTOR:g}x the default "
                      f"{get_rule(icv.rule).default_alpha:g}); the steering will likely dominate and degrade outputs",
                      stacklevel=2)
    return strength


def check_alpha(alpha: float) -> float:
    value = float(alpha)
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"alpha must be a finite number >= 0, got {alpha!r}")
    return value


def _validate_vectors(vectors: dict[int, torch.Tensor], hidden: int, num_layers: int, where: str) -> None:
    if not vectors:
        raise ICVError(f"{where}: holds no layer vectors")
    for index, vector in vectors.items():
        name = f"{TENSOR_PREFIX}{index}"
        if not isinstance(index, int) or not 0 <= index < num_layers:
            raise ICVError(f"{where}: {name} is outside the model's {num_layers} layers")
        if vector.dtype != torch.float32:
            raise ICVError(f"{where}: {name} is {str(vector.dtype).removeprefix('torch.')}, expected float32")
        if tuple(vector.shape) != (hidden,):
            raise ICVError(f"{where}: {name} has shape {list(vector.shape)}, expected [{hidden}] (hidden size)")
        if not bool(torch.isfinite(vector).all()):
            raise ICVError(f"{where}: {name} holds NaN or Inf values")


def _meta_int(meta: dict, key: str, where: str) -> int:
    try:
        value = int(meta[key])
    except KeyError:
        raise ICVError(f"{where}: metadata lacks {key!r}") from None
    except ValueError:
        raise ICVError(f"{where}: metadata {key}={shown(meta[key])} is not an integer") from None
    if value < 0:
        raise ICVError(f"{where}: metadata {key}={shown(value)} is negative")
    if value > MAX_META_INT:
        raise ICVError(f"{where}: metadata {key}={shown(value)} is implausibly large (over {MAX_META_INT})")
    return value


def _meta_float(meta: dict, key: str, where: str) -> float:
    try:
        value = float(meta[key])
    except KeyError:
        raise ICVError(f"{where}: metadata lacks {key!r}") from None
    except ValueError:
        raise ICVError(f"{where}: metadata {key}={shown(meta[key])} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ICVError(f"{where}: metadata {key}={shown(meta[key])} must be a finite number >= 0")
    return value


_KNOWN_KEYS = {
    "format", "format_version", "rule", "site", "alpha", "scale_factor", "strength", "sign_convention",
    "method", "positions", "num_demos", "demos_sha256", "model_type", "hidden_size", "num_layers",
    "source", "source_sha256", NORMS_KEY,
}


def _read_norms(meta: dict, where: str) -> dict[int, float]:
    """``mlp_output_norms``: JSON {"<layer>": norm}; absent in files of older ckptops."""
    text = meta.get(NORMS_KEY)
    if text is None:
        return {}
    from ckptops.safeio import loads_json

    raw = loads_json(text, f"{where}: metadata {NORMS_KEY}", ICVError)  # nesting, NaN, surrogates
    try:
        norms = {int(k): float(v) for k, v in raw.items()}
    except (ValueError, TypeError, AttributeError, OverflowError):
        raise ICVError(f"{where}: metadata {NORMS_KEY} is not a JSON object of layer -> number") from None
    bad = [i for i, v in norms.items() if not math.isfinite(v) or v < 0]
    if bad:
        raise ICVError(f"{where}: metadata {NORMS_KEY} holds a negative or non-finite norm for layer {shown(bad[0])}")
    return norms


def is_icv_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a regular file whose safetensors metadata says it is a ckptops ICV.

    Only the header is read (``path`` may name a multi-gigabyte weight shard), and nothing else is
    validated: this tells an earlier ICV, which ``icv compute --overwrite`` may replace, from any
    other file, which it must not."""
    from ckptops.checkpoint.header import read_header
    from ckptops.errors import HeaderError

    file = Path(path)
    if not file.is_file():  # a FIFO or device is never opened: it could block or never end
        return False
    try:
        return read_header(file).metadata.get("format") == FORMAT_NAME
    except (HeaderError, OSError):
        return False


def missing_icv(path: str | os.PathLike, error: type[Exception] = ICVError) -> Exception:
    """The error for an ICV path that is not a regular file: absent, a folder, or a device or FIFO
    such as ``/dev/zero`` (which exists, so "no such file" would mislead)."""
    file = Path(path)
    if not file.exists():
        return error(f"{path}: no such ICV file")
    if file.is_dir():
        return error(f"{path}: is a folder, not a file")
    return error(f"{path}: not a regular file (a device, FIFO or socket); an ICV is a .safetensors file")


def load_icv(path: str | os.PathLike) -> ICV:
    """Read and validate an ICV file; raise ICVError naming the file and the problem."""
    from safetensors import SafetensorError, safe_open

    where = str(path)
    file = Path(path)
    if not file.is_file():
        raise missing_icv(path)
    from ckptops.checkpoint.header import read_header

    from ckptops.errors import HeaderError

    try:
        read_header(file)  # every header check (at least safetensors' own) before safe_open maps it
    except HeaderError as exc:
        raise ICVError(f"{exc} (not a readable safetensors file)") from None
    try:
        with safe_open(file, framework="pt", device="cpu") as handle:
            meta = dict(handle.metadata() or {})
            names = list(handle.keys())
            if meta.get("format") != FORMAT_NAME:
                raise ICVError(f"{where}: not a ckptops ICV file (metadata 'format' is {shown(meta.get('format'))}, expected {FORMAT_NAME!r})")
            version = meta.get("format_version")
            if version not in READABLE_VERSIONS:
                raise ICVError(f"{where}: unknown ICV format version {shown(version)}; this ckptops reads versions "
                               f"{', '.join(READABLE_VERSIONS)} (upgrade ckptops)")
            vectors: dict[int, torch.Tensor] = {}
            for name in names:
                match = _TENSOR_NAME.fullmatch(name)
                if match is None:
                    raise ICVError(f"{where}: unexpected tensor {shown(name)} (an ICV file holds only icv.layers.<i>)")
                vectors[int(match.group(1))] = handle.get_tensor(name)
    except SafetensorError as exc:
        raise ICVError(f"{where}: not a readable safetensors file ({exc})") from None
    except OSError as exc:
        raise ICVError(f"{where}: cannot read ({exc.strerror or exc})") from None

    rule_name = meta.get("rule", "")
    if rule_name not in RULES:
        raise ICVError(f"{where}: unknown rule {shown(rule_name)} (known: {', '.join(RULES)})")
    rule = RULES[rule_name]
    if meta.get("site", rule.site) != rule.site:
        raise ICVError(f"{where}: site {shown(meta.get('site'))} does not match rule {rule_name!r} (expected {rule.site!r})")
    method = meta.get("method", "")
    if method not in METHODS:
        raise ICVError(f"{where}: unknown method {shown(method)} (known: {', '.join(METHODS)})")
    positions = meta.get("positions", "")
    if positions not in POSITIONS:
        raise ICVError(f"{where}: unknown positions {shown(positions)} (known: {', '.join(POSITIONS)})")
    hidden = _meta_int(meta, "hidden_size", where)
    num_layers = _meta_int(meta, "num_layers", where)
    if hidden == 0 or num_layers == 0:
        raise ICVError(f"{where}: hidden_size and num_layers must be positive")
    _validate_vectors(vectors, hidden, num_layers, where)
    norms = _read_norms(meta, where)
    if rule_name == "additive" and version == "1":
        raise ICVError(f"{where}: the additive rule needs format version 2, the file says 1")
    icv = ICV(
        vectors=vectors,
        hidden_size=hidden,
        num_layers=num_layers,
        rule=rule_name,
        alpha=_meta_float(meta, "alpha", where),
        scale_factor=_meta_float(meta, "scale_factor", where),
        method=method,
        positions=positions,
        num_demos=_meta_int(meta, "num_demos", where),
        demos_sha256=meta.get("demos_sha256", ""),
        model_type=meta.get("model_type", ""),
        source=meta.get("source", ""),
        source_sha256=meta.get("source_sha256", ""),
        extra={k: v for k, v in meta.items() if k not in _KNOWN_KEYS},
        mlp_norms=norms,
    )
    if rule_name == "additive":
        icv.require_norms(where)
    return icv
