"""Find a transformers model's decoder layers and the module whose output is each layer's MLP block.

Both the ICV computation (which reads every decoder layer's residual output) and the loader patch
(which steers the MLP block's output) need these modules, and must find them without replacing
anything. Known layouts are tried first (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, OLMo and most
decoder-only models use ``model.layers``; GPT-2 uses ``transformer.h``; GPT-NeoX ``gpt_neox.layers``;
multimodal Gemma 3 ``model.language_model.layers``); anything else falls back to the official
code's rule, the longest ``nn.ModuleList`` in the model.

**The MLP site.** The official code wraps ``layer.mlp``, i.e. it steers the tensor the MLP block
adds to the residual stream. In Gemma 2/3 (and OLMo 2) that tensor is not the MLP's own output but
``post_feedforward_layernorm(mlp(x))``; steering before that norm would let the norm's learned
scale distort the direction, which was measured in residual space. So when a layer has a
``post_feedforward_layernorm`` we steer its output; everywhere else ``layer.mlp`` (or
``feed_forward`` / ``ffn``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ckptops.errors import ICVError

KNOWN_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 2/3 text, Phi-3, OLMo, ...
    "model.language_model.layers",  # multimodal wrappers (Gemma 3, Llava-style)
    "language_model.model.layers",
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.layers",
    "transformer.blocks",
)
RESIDUAL_NORM_AFTER_MLP = ("post_feedforward_layernorm",)
MLP_NAMES = ("mlp", "feed_forward", "ffn", "feedforward", "block_sparse_moe")


@dataclass(frozen=True)
class DecoderLayout:
    """Where a model keeps its decoder layers and the module that produces each MLP block output."""

    layers: nn.ModuleList
    layers_path: str
    mlp_site_name: str
    hidden_size: int
    model_type: str

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def mlp_site(self, index: int) -> nn.Module:
        """The module whose output is the MLP block output of decoder layer ``index``."""
        return getattr(self.layers[index], self.mlp_site_name)

    def describe(self) -> str:
        return f"{self.layers_path}[0..{self.num_layers - 1}].{self.mlp_site_name}"


def text_config(model: nn.Module):
    """The config that describes the decoder stack (the text config of multimodal models)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ICVError(f"{type(model).__name__}: not a transformers model (no .config)")
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _longest_module_list(model: nn.Module) -> tuple[str, nn.ModuleList | None]:
    best_name, best = "", None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best)):
            best_name, best = name, module
    return best_name, best


def _mlp_site_name(layer: nn.Module) -> str | None:
    for name in RESIDUAL_NORM_AFTER_MLP + MLP_NAMES:
        if isinstance(getattr(layer, name, None), nn.Module):
            return name
    return None


def find_decoder_layout(model: nn.Module) -> DecoderLayout:
    """Locate the decoder layers and MLP sites of ``model``; raise ICVError if it has none."""
    config = text_config(model)
    model_type = str(getattr(config, "model_type", "") or type(model).__name__)
    expected = getattr(config, "num_hidden_layers", None)
    layers, path = None, ""
    for candidate in KNOWN_LAYER_PATHS:
        found = _get_path(model, candidate)
        if isinstance(found, nn.ModuleList) and len(found) > 0 and (expected is None or len(found) == expected):
            layers, path = found, candidate
            break
    if layers is None:
        path, layers = _longest_module_list(model)
        if layers is None or len(layers) == 0:
            raise ICVError(f"{model_type}: cannot find the decoder layers (no nn.ModuleList in {type(model).__name__})")
    site = _mlp_site_name(layers[0])
    if site is None:
        children = ", ".join(name for name, _ in layers[0].named_children())
        raise ICVError(f"{model_type}: cannot find the MLP block in {path}[0] (children: {children})")
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(hidden, int) or hidden <= 0:
        raise ICVError(f"{model_type}: config has no usable hidden_size")
    return DecoderLayout(layers=layers, layers_path=path, mlp_site_name=site, hidden_size=hidden, model_type=model_type)


def input_device(model: nn.Module) -> torch.device:
    """Where to put input ids: CPU for accelerate-dispatched models (their hooks move inputs),
    otherwise the device of the input embeddings."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        devices = {str(d) for d in device_map.values()}
        if len(devices) == 1 and devices.isdisjoint({"cpu", "disk", "meta"}):
            # a single-device map is not dispatched (no hooks), so inputs must go there ourselves
            only = next(iter(device_map.values()))
            return torch.device(f"cuda:{only}" if isinstance(only, int) else only)
        return torch.device("cpu")
    try:
        device = model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device
