"""How far, and in which direction, the target moved from the base: the figures of
``ckptops diagnose`` (and of every ``sanitize`` run), from five float64 sums.

With d = theta_t - theta_b (the target's drift), tau = theta_H - theta_b (the harm vector) and
M tau the part of tau that HDR selects (``|tau| >= t``, the same exact threshold ``sanitize``
uses), every figure of a group of values follows from

    dd = sum d^2,  tt = sum tau^2,  dt = sum d*tau,  mm = sum (M tau)^2,  dm = sum d*(M tau)

    ||tau|| = sqrt(tt)             ||d|| = sqrt(dd)
    cos(d, tau)   = dt / sqrt(dd * tt)
    cos(d, M tau) = dm / sqrt(dd * mm)
    projection    = dm / mm        (the scale that best explains d along M tau, least squares)
    step          = ||lambda M tau|| / ||d||   = |lambda| sqrt(mm) / sqrt(dd)
    residual      = ||d - lambda M tau|| / ||d|| = sqrt(dd - 2 lambda dm + lambda^2 mm) / sqrt(dd)

``residual`` is how far the sanitized model, theta_t - lambda M tau, lies from the base, against
how far the target lay. Sums add over chunks, workers and tensors, so a streaming pass
accumulates them per chunk (float64 throughout) and merges them like histograms; a group's
sums are the sum of its tensors' sums. d is exact (the difference of two float32 values in
float64); tau and M tau are the float32 values HDR subtracts.

The verdict thresholds are documented in the README ("Will HDR help this target?").
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, field

import numpy as np

from ckptops.hdr.layers import layer_index

#: the order of the five sums in every accumulator array
SUMS = ("dd", "tt", "dt", "mm", "dm")
#: the group of tensors outside the decoder layers (embeddings, final norm, lm_head)
OTHER = "other"

#: cos(d, tau) at or above this: the target moved along the harm direction
ALIGNED_COS = 0.5
#: cos(d, tau) below this: the target barely moved along the harm direction (a warning)
WEAK_COS = 0.2


def group_key(name: str) -> str:
    """The per-layer group a tensor's figures count toward: ``layer <i>`` or ``other``."""
    layer = layer_index(name)
    return OTHER if layer is None else f"layer {layer}"


def _order(key: str) -> tuple[int, int]:
    return (1, 0) if key == OTHER else (0, int(key.split()[1]))


class DriftSums:
    """The five sums and the value count per layer group (``layer <i>`` / ``other``).

    Chunks add into their own accumulator (:meth:`chunk_slot`), and a group's sums add those up
    in (tensor name, offset) order when read, so that the figures do not depend on which worker
    thread took which chunk: a rerun records the same ``ckptops.json``. :meth:`slot` is a running
    accumulator per group for sums that are not per chunk (diagnose's band bins)."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.parts: dict[tuple[str, int], tuple[str, np.ndarray]] = {}
        self.counts: dict[str, int] = {}

    def slot(self, key: str) -> np.ndarray:
        """The running float64[5] accumulator of ``key`` (created at zero)."""
        found = self.sums.get(key)
        if found is None:
            found = self.sums[key] = np.zeros(len(SUMS), dtype=np.float64)
        return found

    def chunk_slot(self, key: str, name: str, start: int) -> np.ndarray:
        """A float64[5] accumulator for the chunk of tensor ``name`` at element ``start``."""
        part = np.zeros(len(SUMS), dtype=np.float64)
        self.parts[(name, start)] = (key, part)
        return part

    def add_count(self, key: str, n: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def merge(self, other: DriftSums) -> None:
        for key, values in other.sums.items():
            self.slot(key)[:] += values
        self.parts.update(other.parts)
        for key, n in other.counts.items():
            self.add_count(key, n)

    def groups(self) -> dict[str, np.ndarray]:
        """The sums of every group: its chunks in (name, offset) order, then its running accumulator."""
        totals = {key: np.zeros(len(SUMS), dtype=np.float64) for key in self.keys()}
        for order in sorted(self.parts):
            key, part = self.parts[order]
            totals[key] += part
        for key, values in self.sums.items():
            totals[key] += values
        return totals

    def group(self, key: str) -> np.ndarray:
        return self.groups()[key]

    def total(self) -> np.ndarray:
        return sum(self.groups().values(), np.zeros(len(SUMS), dtype=np.float64))

    def keys(self) -> list[str]:
        return sorted(set(self.sums) | {k for k, _ in self.parts.values()} | set(self.counts), key=_order)


def _stable(x: float | None, digits: int = 9) -> float | None:
    """``x`` to ``digits`` significant digits. The worker threads add chunk sums in whatever
    order they finish, so the last bits of a float64 sum vary from run to run (relative ~1e-13);
    rounded, the figures recorded in ``ckptops.json`` and the model card repeat byte for byte."""
    if x is None or x == 0 or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


@dataclass
class DriftFigures:
    """The figures of one group (the whole model or one layer); None where undefined (a zero norm)."""

    values: int
    norm_tau: float
    norm_drift: float
    norm_masked_tau: float
    cos_tau: float | None
    cos_masked_tau: float | None
    projection: float | None
    step_ratio: float | None
    residual_ratio: float | None

    @classmethod
    def from_sums(cls, sums: np.ndarray, values: int, scale: float) -> DriftFigures:
        dd, tt, dt, mm, dm = (float(x) for x in sums)
        residual_sq = max(0.0, dd - 2.0 * scale * dm + scale * scale * mm)
        return cls(
            values=int(values),
            norm_tau=_stable(math.sqrt(tt)),
            norm_drift=_stable(math.sqrt(dd)),
            norm_masked_tau=_stable(math.sqrt(mm)),
            cos_tau=_stable(_ratio(dt, math.sqrt(dd * tt))),
            cos_masked_tau=_stable(_ratio(dm, math.sqrt(dd * mm))),
            projection=_stable(_ratio(dm, mm)),
            step_ratio=_stable(_ratio(abs(scale) * math.sqrt(mm), math.sqrt(dd))),
            residual_ratio=_stable(_ratio(math.sqrt(residual_sq), math.sqrt(dd))),
        )


@dataclass
class Verdict:
    """``kind``: ``aligned``, ``partial``, ``weak`` (a warning), ``unchanged`` (theta_t = theta_b:
    the paper's base-model setting), ``no-harm-vector`` (tau = 0) or ``nothing-counted`` (no tensor
    took part); ``message``: plain words."""

    kind: str
    warning: bool
    message: str


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def verdict(overall: DriftFigures, scale: float) -> Verdict:
    """What the whole-model figures say about HDR at ``scale`` on this target (see the README)."""
    if overall.values == 0:  # not tau = 0: no value was counted (sanitize warned why before the run)
        return Verdict("nothing-counted", False, "no tensor took part in HDR (all excluded, outside --layers, "
                       "not floating point or only in the target): HDR changed nothing")
    if overall.norm_tau == 0.0:
        return Verdict("no-harm-vector", True, "the harmful model equals the base in every counted tensor "
                       "(tau = 0): HDR changes nothing")
    if overall.norm_drift == 0.0:
        return Verdict("unchanged", False, "the target equals the base in every counted tensor (theta_t = theta_b, "
                       "the paper's base-model setting): the weights cannot predict what HDR will do; "
                       "evaluate the result (`ckptops eval`, or search the strength with `ckptops tune`)")
    cos, step, residual = overall.cos_tau, overall.step_ratio, overall.residual_ratio
    moves = (f"HDR at scale {scale:g} moves the weights {_fmt(step, 1)}x as far as fine-tuning did, and leaves "
             f"them {_fmt(residual)}x as far from the base as the target was")
    if cos >= ALIGNED_COS:
        return Verdict("aligned", False, f"the target moved along the harm direction (cos {cos:.2f}): HDR is likely "
                       f"to remove what fine-tuning added; {moves} (projection suggests scale "
                       f"{_fmt(overall.projection)}; `ckptops tune` searches it against behaviour)")
    if cos < WEAK_COS or residual > 1.0:
        how = "moved away from" if cos < 0 else ("barely moved along" if cos < WEAK_COS else "moved only partly along")
        return Verdict("weak", True, f"the target {how} the harm direction (cos {cos:.2f}); {moves}: expect damage, "
                       "run `ckptops tune` to search the strength against behaviour")
    return Verdict("partial", False, f"the target moved partly along the harm direction (cos {cos:.2f}): HDR may "
                   f"remove part of what fine-tuning added; {moves}; check the result with `ckptops eval`")


@dataclass
class DriftReport:
    """The drift figures of a (base, harmful, target) triple for one HDR setting."""

    overall: DriftFigures
    layers: dict[str, DriftFigures]
    verdict: Verdict
    scale: float
    parameters: dict = field(default_factory=dict)

    @classmethod
    def from_sums(cls, drift: DriftSums, scale: float, parameters: dict | None = None) -> DriftReport:
        groups = drift.groups()
        layers = {key: DriftFigures.from_sums(sums, drift.counts.get(key, 0), scale) for key, sums in groups.items()}
        total = sum(groups.values(), np.zeros(len(SUMS), dtype=np.float64))
        overall = DriftFigures.from_sums(total, sum(drift.counts.values()), scale)
        return cls(overall, layers, verdict(overall, scale), scale, dict(parameters or {}))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DriftReport:
        """The report back from :meth:`to_dict` (e.g. a recipe run's JSON summary)."""
        return cls(DriftFigures(**data["overall"]), {k: DriftFigures(**v) for k, v in data["layers"].items()},
                   Verdict(**data["verdict"]), data["scale"], dict(data.get("parameters") or {}))

    def summary(self) -> dict:
        """The whole-model figures and the verdict (what ``ckptops.json`` and the card record)."""
        return {"overall": asdict(self.overall), "verdict": asdict(self.verdict),
                "layers": {k: asdict(v) for k, v in self.layers.items()}}

    def format_text(self, per_layer: bool = True) -> str:
        o = self.overall
        lines = [
            f"drift of the target from the base, against tau = harmful - base ({o.values:,} values)",
            f"  ||tau|| {o.norm_tau:.4g}   ||theta_t - theta_b|| {o.norm_drift:.4g}   ||M tau|| {o.norm_masked_tau:.4g}",
            f"  cos(theta_t - theta_b, tau)    {_fmt(o.cos_tau, 3)}",
            f"  cos(theta_t - theta_b, M tau)  {_fmt(o.cos_masked_tau, 3)}",
            f"  projection <d, M tau>/||M tau||^2  {_fmt(o.projection, 3)}",
            f"  at scale {self.scale:g}: ||lambda M tau||/||d|| {_fmt(o.step_ratio)}, "
            f"||d - lambda M tau||/||d|| {_fmt(o.residual_ratio)}",
        ]
        if per_layer and self.layers:
            lines.append(f"  {'group':<10} {'||tau||':>9} {'||d||':>9} {'cos tau':>8} {'cos Mtau':>8} "
                         f"{'proj':>7} {'step':>7} {'resid':>7}")
            for key, f in self.layers.items():
                lines.append(f"  {key:<10} {f.norm_tau:>9.3g} {f.norm_drift:>9.3g} {_fmt(f.cos_tau, 3):>8} "
                             f"{_fmt(f.cos_masked_tau, 3):>8} {_fmt(f.projection, 3):>7} {_fmt(f.step_ratio):>7} "
                             f"{_fmt(f.residual_ratio):>7}")
        lines.append(("warning: " if self.verdict.warning else "verdict: ") + self.verdict.message)
        return "\n".join(lines)


# ---------------------------------------------------------------- numpy chunk sums

#: values per float64 slice: the sums run over slices so that the scratch stays small
SLICE = 1 << 15
_scratch = threading.local()


def _buffers() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    found = getattr(_scratch, "buffers", None)
    if found is None:
        found = _scratch.buffers = tuple(np.empty(SLICE, dtype=np.float64) for _ in range(3))
    return found


def add_chunk_sums(sums: np.ndarray, target: np.ndarray, base: np.ndarray, tau: np.ndarray,
                   masked: np.ndarray | None) -> None:
    """Add one chunk's five sums to ``sums`` (float64[5]); inputs are float32 arrays of equal
    length: theta_t, theta_b, tau and M tau (``masked is tau``: everything selected; None: only
    dd, tt and dt are added). The numpy twin of the sums in ``_fused.c``'s update loop. A
    NaN/Inf input gives NaN sums without a numpy warning: the caller's finiteness check then
    stops the run with a message naming the tensor."""
    with np.errstate(all="ignore"):
        _add_chunk_sums(sums, target, base, tau, masked)


def _add_chunk_sums(sums: np.ndarray, target: np.ndarray, base: np.ndarray, tau: np.ndarray,
                    masked: np.ndarray | None) -> None:
    d64, x64, m64 = _buffers()
    n = target.shape[0]
    for i in range(0, n, SLICE):
        m = min(SLICE, n - i)
        d, x = d64[:m], x64[:m]
        np.copyto(d, target[i:i + m])
        np.copyto(x, base[i:i + m])
        np.subtract(d, x, out=d)
        np.copyto(x, tau[i:i + m])
        dx = float(np.dot(d, x))
        sums[0] += float(np.dot(d, d))
        sums[1] += float(np.dot(x, x))
        sums[2] += dx
        if masked is None:
            continue
        if masked is tau:
            sums[3] += float(np.dot(x, x))
            sums[4] += dx
        else:
            mk = m64[:m]
            np.copyto(mk, masked[i:i + m])
            sums[3] += float(np.dot(mk, mk))
            sums[4] += float(np.dot(d, mk))
