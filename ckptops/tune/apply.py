"""Write a candidate's HDR weights into a loaded model, bit for bit what ``sanitize`` writes.

``tune`` judges many (scale, top-k) settings on one loaded target. Writing a checkpoint per trial
would cost a full write and reload each time; instead every HDR tensor of the model is
overwritten in place with

    theta = round(float32(theta_t) - scale * hardshrink(tau, float_before(t)))

computed from the checkpoint files, chunk by chunk, with exactly the operations of the engine's
torch path (:func:`ckptops.hdr.kernels_torch.hdr_chunk`): tau = float32(theta_H) -
float32(theta_b); hardshrink at the float just below the exact top-k threshold t (so
``|tau| >= t`` is kept, ties included); multiply by ``scale``; subtract from float32(theta_t);
round once, to nearest even, to the checkpoint's dtype. The thresholds come from the engine's
own selection (:func:`ckptops.hdr.engine.select_thresholds_many` on the plan of
:func:`ckptops.hdr.plan.make_plan`): one pass serves every top-k asked for together, and
the thresholds are cached.

Every candidate is computed from the original files, never from the previous candidate's
weights, so switching scale or top-k accumulates no rounding; :meth:`InMemoryHDR.restore` puts
the target's own values back.

Memory: the model itself (4 bytes per parameter in float32) plus three float32 work buffers and
one staging buffer of ``chunk`` elements (about 20 MiB at the default 1M); tau is streamed from
the files (``pread``, through the page cache) for every candidate, never held whole. Time: one
read of base, harmful and target per candidate (on SmolLM2-135M about a second; see
``bench/bench_tune.py``).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

from ckptops.checkpoint.dtypes import torch_dtype
from ckptops.checkpoint.lora import open_inputs
from ckptops.errors import TensorValueError, UsageError
from ckptops.hdr.chunks import WorkerPool, single_threaded_torch
from ckptops.hdr.engine import Models, Selection, select_thresholds_many
from ckptops.hdr.plan import Plan, TensorTask, make_plan
from ckptops.hdr.select import float_before

DEFAULT_CHUNK = 1 << 20


class InMemoryHDR:
    """The HDR tensors of ``model`` (loaded from ``target``), rewritable for any (scale, top-k).

    Args:
        base, harmful, target: checkpoint folders or Hub references (as for ``sanitize``).
        model: a torch module holding the target's weights; its ``state_dict()`` names must be
            the checkpoint's tensor names (true for transformers models saved by transformers).
        scope, exclude, layers: as for ``sanitize``; fixed for the session.
        chunk: elements per work buffer.
    """

    def __init__(self, base: str | os.PathLike, harmful: str | os.PathLike, target: str | os.PathLike,
                 model: Any, *, scope: str = "global", exclude: tuple[str, ...] | list[str] = (),
                 layers: frozenset[int] | None = None, chunk: int = DEFAULT_CHUNK, workers: int = 1) -> None:
        import torch

        opened = open_inputs(base, harmful, target)  # harmful may be a LoRA adapter (checkpoint/lora.py)
        self.models = Models(opened.tau_base, opened.harmful, opened.target)
        self.plan: Plan = make_plan(self.models.base, self.models.harmful, self.models.target,
                                    scope=scope, exclude=list(exclude), layers=layers)
        self.chunk = chunk
        self.workers = workers
        self._selections: dict[float, dict[str, Selection]] = {}
        state = model.state_dict(keep_vars=False)
        self.tensors: dict[str, torch.Tensor] = {}
        for task in self.plan.hdr_tasks:
            tensor = state.get(task.name)
            if tensor is None:
                raise UsageError(f"{task.name}: in the checkpoint but not in the loaded model's state dict "
                                 "(tune needs the model's parameter names to match the checkpoint's)")
            if tuple(tensor.shape) != tuple(task.target.shape):
                raise UsageError(f"{task.name}: the loaded model has shape {list(tensor.shape)}, "
                                 f"the checkpoint {list(task.target.shape)}")
            if not tensor.is_contiguous():
                raise UsageError(f"{task.name}: the loaded model's tensor is not contiguous")
            self.tensors[task.name] = tensor
        self.buffers = [torch.empty(chunk, dtype=torch.float32) for _ in range(3)]
        from ckptops.checkpoint.reader import Staging

        self.stage = Staging(chunk)
        self._merge_adapter(state)

    def _merge_adapter(self, state: dict) -> None:
        """A ``BASE+ADAPTER`` target is loaded from BASE: write the adapted tensors' merged values
        (float32(base) + delta, rounded once to the checkpoint's dtype, as ``sanitize`` writes the
        unchanged target) into every adapted tensor, HDR or not, so the loaded model is the target."""
        modules = getattr(self.models.target.synthetic, "modules", None)
        if not modules or getattr(self.models.target.synthetic, "base", None) is None:
            return
        for task in self.plan.tasks:  # tensors the adapter leaves alone are the base's already
            if task.name not in modules:
                continue
            if task.name not in self.tensors:  # adapted but not an HDR tensor (--exclude, --layers)
                tensor = state.get(task.name)
                if tensor is None or tuple(tensor.shape) != tuple(task.target.shape) or not tensor.is_contiguous():
                    raise UsageError(f"{task.name}: adapted by the target's adapter but not a matching tensor "
                                     "of the loaded base model")
                self.tensors[task.name] = tensor
            self._write_task(task, 0.0, None, hdr=False)

    # -- thresholds ----------------------------------------------------------------------------
    def selections(self, top_k: float, progress: Callable[[int], None] | None = None) -> dict[str, Selection]:
        """The exact thresholds of every scope group for ``top_k`` (one streaming pass, cached)."""
        return self.prepare([top_k], progress)[top_k]

    def prepare(self, top_ks: list[float], progress: Callable[[int], None] | None = None
                ) -> dict[float, dict[str, Selection]]:
        """The thresholds of several top-k, those not cached found together: one selection pass
        over base and harmful serves every top-k of a grid (see
        :func:`ckptops.hdr.engine.select_thresholds_many`)."""
        for top_k in top_ks:
            if not math.isfinite(top_k) or not 0 < top_k <= 1:
                raise UsageError(f"top-k must be a fraction in (0, 1], got {top_k!r}")
        missing = sorted({k for k in top_ks if k not in self._selections})
        if missing:
            with single_threaded_torch():
                pool = WorkerPool(self.workers, self.chunk)
                try:
                    self._selections.update(select_thresholds_many(self.plan, self.models, pool, missing, progress))
                finally:
                    pool.close()
        return {k: self._selections[k] for k in top_ks}

    # -- writing weights -------------------------------------------------------------------------
    def apply(self, scale: float, top_k: float) -> None:
        """Overwrite every HDR tensor with the candidate's values (from the files, exactly)."""
        if not math.isfinite(scale):
            raise UsageError(f"scale must be a finite number, got {scale!r}")
        selections = self.selections(top_k) if scale != 0.0 else None
        for task in self.plan.hdr_tasks:
            shrink = None
            if selections is not None:
                threshold = selections[task.group].threshold
                shrink = float_before(threshold) if threshold is not None and threshold > 0.0 else None
            self._write_task(task, scale, shrink, hdr=selections is not None)

    def restore(self) -> None:
        """Put the target's own values back into every HDR tensor."""
        for task in self.plan.hdr_tasks:
            self._write_task(task, 0.0, None, hdr=False)

    def _write_task(self, task: TensorTask, scale: float, shrink: float | None, *, hdr: bool) -> None:
        import torch

        a, b, c = self.buffers
        files, stage = self.models.files, self.stage
        dest = self.tensors[task.name].view(-1)
        out_dtype = torch_dtype(task.out_dtype)
        for start in range(0, task.numel, self.chunk):
            stop = min(start + self.chunk, task.numel)
            n = stop - start
            stage.read_f32(files, self.models.target, task.target, start, stop, c)
            result = c[:n]
            if hdr:
                stage.read_f32(files, self.models.harmful, task.harmful, start, stop, a)
                stage.read_f32(files, self.models.base, task.base, start, stop, b)
                tau = a[:n]
                tau.sub_(b[:n])
                if shrink is not None:
                    torch.hardshrink(tau, shrink, out=b[:n])
                    tau = b[:n]
                tau.mul_(scale)
                result.sub_(tau)
                if not bool(torch.isfinite(result).all()):
                    raise TensorValueError(f"tensor {task.name!r}: theta_t - scale * tau is not finite at scale {scale!r}")
            rounded = result if out_dtype == torch.float32 else result.to(out_dtype)
            dest[start:stop].copy_(rounded)

    def close(self) -> None:
        self.models.files.close()
