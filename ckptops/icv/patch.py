"""Apply an ICV to a transformers model with forward hooks, and load checkpoints that carry one.

Two rules (the official code's and the paper's equation), both per token, at every position -- prompt and generated tokens, with or
without KV cache, since each token's state is steered independently:

* **official** (default; what produced the paper's numbers) on each steered layer's MLP block
  output x, with v the stored safe-ward vector and s = scale_factor·α = 0.1·0.12 = 0.012::

      g     = 1 + max(0, cos(x, −v))
      x_new = normalize(x/‖x‖ + s·g·v/‖v‖) · ‖x‖          (float32, cast back)

* **paper** (Eqs. 9–10) on each steered decoder layer's output h: h_new = (h + α·v)·‖h‖/‖h + α·v‖.

* **additive** on each steered layer's MLP block output x: x_new = x + u_l, no gate and no
  renormalisation, with the absolute vector u_l = s·m_l·v/‖v‖ (s = 0.1·α, m_l the layer's typical
  MLP-output norm recorded in the file). Where the MLP output is added straight to the residual
  stream this equals a ``down_proj`` bias (``ckptops icv bake``) and a llama.cpp control vector
  on that layer's output (``ckptops icv export-gguf``).

Nothing is replaced: the hooks are plain ``register_forward_hook`` hooks, so accelerate's own
hooks (device maps, disk offload) keep working and :meth:`ICVHandle.remove` gives back a model
that computes bit-identical logits.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ckptops.errors import ICVError
from ckptops.icv._extras import require_transformers
from ckptops.icv.arch import DecoderLayout, find_decoder_layout
from ckptops.icv.file import ICV, ICV_FILENAME, check_strength, load_icv

_HANDLE_ATTR = "_ckptops_icv_handle"
_ORIGINAL_ATTR = "_ckptops_original_from_pretrained"
logger = logging.getLogger("ckptops.icv")


class _Steering:
    """Base forward hook: swaps the steered tensor in the module output, keeps the rest."""

    def __init__(self, vector: torch.Tensor, strength: float) -> None:
        self.vector = vector.detach().to("cpu", torch.float32)
        self.strength = float(strength)
        self._by_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        cached = self._by_device.get(device)
        if cached is None:
            cached = self._prepare(self.vector.to(device))
            self._by_device[device] = cached
        return cached

    def _prepare(self, vector: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def steer(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (self.steer(output[0]),) + tuple(output[1:])
        return self.steer(output)


class OfficialSteering(_Steering):
    """The official Safety Arithmetic / ICV rule on an MLP block output (see module docstring)."""

    def _prepare(self, vector: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.normalize(vector, dim=-1), -vector

    def steer(self, x: torch.Tensor) -> torch.Tensor:
        unit, negated = self.constants(x.device)
        xf = x.float()
        norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
        gate = 1.0 + F.cosine_similarity(xf, negated, dim=-1).clamp_min(0.0).unsqueeze(-1)
        steered = F.normalize(F.normalize(xf, dim=-1) + self.strength * gate * unit, dim=-1) * norm
        return steered.to(x.dtype)


class PaperSteering(_Steering):
    """The paper's plain rule on a decoder layer output: add α·v, keep the original norm."""

    def _prepare(self, vector: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.strength * vector,)

    def steer(self, x: torch.Tensor) -> torch.Tensor:
        (shift,) = self.constants(x.device)
        xf = x.float()
        norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
        return (F.normalize(xf + shift, dim=-1) * norm).to(x.dtype)


class AdditiveSteering(_Steering):
    """The additive rule on an MLP block output: add the absolute vector u_l (computed in float32,
    cast back). The hook gets u_l itself, so its strength is already folded in."""

    def _prepare(self, vector: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (vector,)

    def steer(self, x: torch.Tensor) -> torch.Tensor:
        (shift,) = self.constants(x.device)
        return (x.float() + shift).to(x.dtype)


class ICVHandle:
    """An applied ICV. ``remove()`` takes every hook out again (also on ``with`` exit)."""

    def __init__(self, model: nn.Module, icv: ICV, layout: DecoderLayout, hooks: list) -> None:
        self.model = model
        self.icv = icv
        self.layout = layout
        self._hooks = hooks

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    @property
    def rule(self) -> str:
        return self.icv.rule

    @property
    def alpha(self) -> float:
        return self.icv.alpha

    @property
    def strength(self) -> float:
        return self.icv.strength

    @property
    def layers(self) -> list[int]:
        return self.icv.layers

    def remove(self) -> None:
        """Detach all hooks; the model computes exactly what it computed before. Idempotent."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)

    def __enter__(self) -> "ICVHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return (f"ICVHandle({state}, rule={self.rule}, alpha={self.alpha:g}, strength={self.strength:g}, "
                f"layers={len(self.layers)}/{self.layout.num_layers})")


def icv_handle(model: nn.Module) -> ICVHandle | None:
    """The ICV currently applied to ``model`` by ckptops, if any."""
    return getattr(model, _HANDLE_ATTR, None)


def apply_icv(model: nn.Module, icv_or_path: ICV | str | os.PathLike, alpha: float | None = None,
              rule: str | None = None) -> ICVHandle:
    """Steer ``model`` with an ICV (object or file path); returns a handle whose ``remove()`` undoes it.

    ``alpha`` overrides the file's α; ``rule`` (``"official"`` / ``"paper"`` / ``"additive"``)
    overrides its rule, with that rule's own scale factor. The file must fit the model (hidden size and layer count).

    Example::

        handle = ckptops.apply_icv(model, "icv.safetensors")      # official rule, s = 0.012
        out = model.generate(**inputs, max_new_tokens=64)
        handle.remove()
    """
    icv = icv_or_path if isinstance(icv_or_path, ICV) else load_icv(icv_or_path)
    where = str(icv_or_path) if not isinstance(icv_or_path, ICV) else "ICV"
    if alpha is not None or rule is not None:
        try:
            icv = icv.with_application(alpha=alpha, rule=rule)
        except ICVError as exc:
            raise ICVError(f"{where}: {str(exc).removeprefix('ICV: ')}") from None
    layout = find_decoder_layout(model)
    existing = icv_handle(model)
    if existing is not None and existing.active:
        raise ICVError(f"{layout.model_type}: an ICV is already applied to this model; call its handle's remove() first")
    try:
        icv.check_fits(layout.hidden_size, layout.num_layers, f"this {layout.model_type} model")
    except ICVError as exc:
        raise ICVError(f"{where}: {exc}") from None
    check_strength(icv, where)  # a non-finite strength would turn every logit into NaN
    hooks = []
    for index in icv.layers:
        module = layout.mlp_site(index) if icv.site == "mlp_output" else layout.layers[index]
        if icv.rule == "additive":
            steering: _Steering = AdditiveSteering(icv.additive_shift(index), 1.0)
        elif icv.rule == "paper":
            steering = PaperSteering(icv.vectors[index], icv.strength)
        else:
            steering = OfficialSteering(icv.vectors[index], icv.strength)
        hooks.append(module.register_forward_hook(steering))
    handle = ICVHandle(model, icv, layout, hooks)
    setattr(model, _HANDLE_ATTR, handle)
    return handle


# -- loading checkpoints that carry an icv.safetensors ------------------------------------------

def _icv_file_in(ref: Any, subfolder: str | None = None) -> Path | None:
    """``ref/[subfolder/]icv.safetensors`` when ``ref`` is a local folder that holds one."""
    if not isinstance(ref, (str, os.PathLike)) or not os.path.isdir(ref):
        return None
    candidate = Path(ref, subfolder or "", ICV_FILENAME)
    return candidate if candidate.is_file() else None


def _unpatched_loader():
    auto = require_transformers("loading a checkpoint").AutoModelForCausalLM
    original = auto.__dict__.get(_ORIGINAL_ATTR)
    return original.__get__(None, auto) if original is not None else auto.from_pretrained


def from_pretrained(folder: str | os.PathLike, *, icv: bool | str | os.PathLike | None = None,
                    alpha: float | None = None, rule: str | None = None, **kwargs: Any):
    """Load a causal LM with transformers and apply ``folder/icv.safetensors`` when it is there.

    ``icv``: None applies the folder's file if present; False never applies; a path applies that
    file. Other keyword arguments go to ``AutoModelForCausalLM.from_pretrained`` (safetensors
    weights only unless you pass ``use_safetensors=False`` yourself). The handle is available as
    ``ckptops.icv.patch.icv_handle(model)``.

    Example::

        model = ckptops.from_pretrained("llama-safe/")          # steered if llama-safe/icv.safetensors exists
    """
    kwargs.setdefault("use_safetensors", True)
    loaded = _unpatched_loader()(folder, **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    if icv is None:
        path = _icv_file_in(folder, kwargs.get("subfolder"))
    elif icv is False:
        path = None
    elif icv is True:
        path = _icv_file_in(folder, kwargs.get("subfolder"))
        if path is None:
            raise ICVError(f"{folder}: holds no {ICV_FILENAME}")
    else:
        path = Path(icv)
    if path is not None:
        handle = apply_icv(model, path, alpha=alpha, rule=rule)
        logger.info("applied %s (%s rule, strength %g, %d layers)", path, handle.rule, handle.strength, len(handle.layers))
    return loaded


def patch_transformers() -> None:
    """From now on, ``AutoModelForCausalLM.from_pretrained(folder)`` applies ``folder/icv.safetensors``.

    Idempotent; :func:`unpatch_transformers` restores the original method. Hub ids are loaded
    unchanged (only local folders are checked for an ICV file).
    """
    auto = require_transformers("patch_transformers()").AutoModelForCausalLM
    if _ORIGINAL_ATTR in auto.__dict__:
        return
    original = auto.__dict__.get("from_pretrained")
    if not isinstance(original, classmethod):
        raise ICVError("cannot patch this transformers version: AutoModelForCausalLM.from_pretrained is not a classmethod")

    def from_pretrained_with_icv(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        loaded = original.__func__(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        path = _icv_file_in(pretrained_model_name_or_path, kwargs.get("subfolder"))
        if path is not None:
            model = loaded[0] if isinstance(loaded, tuple) else loaded
            handle = apply_icv(model, path)
            logger.info("applied %s (%s rule, strength %g)", path, handle.rule, handle.strength)
        return loaded

    from_pretrained_with_icv.__doc__ = original.__func__.__doc__
    setattr(auto, _ORIGINAL_ATTR, original)
    auto.from_pretrained = classmethod(from_pretrained_with_icv)


def unpatch_transformers() -> None:
    """Undo :func:`patch_transformers` (a no-op when not patched)."""
    auto = require_transformers("unpatch_transformers()").AutoModelForCausalLM
    original = auto.__dict__.get(_ORIGINAL_ATTR)
    if original is None:
        return
    auto.from_pretrained = original
    delattr(auto, _ORIGINAL_ATTR)
