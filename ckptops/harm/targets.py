"""``harm make --target-modules`` and ``--rank`` checked against the base's modules before any
weight is loaded or any adapter built.

Why here and not left to peft: a name that matches nothing is a 46-line peft traceback; a
module that is not a linear layer of the decoder layers (``embed_tokens``, ``lm_head``) trains
an adapter that ``sanitize`` and ``tune`` then refuse (an embedding adapter, or a saved copy of
the whole head: see :mod:`ckptops.checkpoint.lora`); and a rank above a module's smaller side
adds nothing (B @ A cannot exceed that rank) while its allocation can run to tens of gigabytes.

The checks run on a skeleton of the model built on torch's ``meta`` device from its config:
the module names and shapes, no weights, in about the time of the config read.
"""

from __future__ import annotations

from ckptops.errors import UsageError
from ckptops.hdr.layers import layer_index


def skeleton(transformers, torch, config):
    """The model's modules with their shapes and no storage (``meta`` tensors)."""
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _linear_types(torch) -> tuple:
    types = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers (fan_in_fan_out)
    except ImportError:  # pragma: no cover - every transformers with AutoModel has it
        return types
    return types + (Conv1D,)


def _matches(name: str, keys: list[str]) -> bool:
    """peft's rule for a list of target names: the module's full name, or its last parts."""
    return any(name == key or name.endswith("." + key) for key in keys)


def check_targets(model, targets: str | list[str], rank: int, base: str, torch) -> None:
    """Refuse (one line each) target names the base does not have, targets that are not linear
    layers inside the decoder layers, and a rank above the smallest targeted dimension."""
    linear = _linear_types(torch)
    output = model.get_output_embeddings()
    modules = dict(model.named_modules())
    usable = [name for name, module in modules.items() if isinstance(module, linear)
              and module is not output and layer_index(name) is not None]
    short = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in usable))
    choices = f"its linear layers: {', '.join(short[:12])}{', ...' if len(short) > 12 else ''}"
    if targets == "all-linear":  # peft's meaning: every linear layer but the output head
        chosen = [name for name, module in modules.items() if isinstance(module, linear) and module is not output]
    else:
        missing = [key for key in targets if not any(_matches(name, [key]) for name in modules)]
        if missing or not targets:
            raise UsageError(f"--target-modules: {', '.join(missing) or '(none)'} not found in {base} ({choices})")
        chosen = [name for name in modules if _matches(name, targets)]
    refused = [name for name in chosen if name not in usable]
    if refused:
        kinds = ", ".join(f"{name} ({type(modules[name]).__name__})" for name in refused[:3])
        more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
        what = "is not a linear layer" if len(refused) == 1 else "are not linear layers"
        raise UsageError(f"--target-modules: {kinds}{more} {what} inside the decoder layers; sanitize and tune "
                         f"cannot use a LoRA adapter there ({choices})")
    if not chosen:
        raise UsageError(f"--target-modules: {base} has no linear layer to adapt")
    smallest = min(chosen, key=lambda name: min(modules[name].weight.shape))
    side = min(modules[smallest].weight.shape)
    if rank > side:
        raise UsageError(f"--rank {rank} is above the smaller side of {smallest} "
                         f"({' x '.join(map(str, modules[smallest].weight.shape))}); a LoRA rank above {side} "
                         "adds nothing there: use at most that")
