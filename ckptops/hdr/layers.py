"""Which decoder layer a tensor belongs to, and parsing of layer lists such as ``4-6,9``.

Hugging Face names decoder-layer tensors ``<prefix>.<layers|h|blocks>.<i>.<...>`` (Llama/Mistral/
Qwen: ``model.layers.3.mlp.up_proj.weight``; GPT-2: ``transformer.h.3...``; GPT-NeoX:
``gpt_neox.layers.3...``). Tensors outside the layer stack (embeddings, final norm, lm_head) have
no layer index.
"""

from __future__ import annotations

import re

from ckptops.errors import UsageError

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a tensor name, or None for tensors outside the layer stack."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


#: no decoder has more layers than this; a range beyond it is a typo (and would cost memory)
MAX_LAYER_INDEX = 100_000


def parse_layers(text: str | None) -> frozenset[int] | None:
    """Parse ``"4-6"``, ``"4,5,6"`` or ``"1-3,9"`` into a set of layer indices (None for None)."""
    if text is None or text == "":
        return None
    if not isinstance(text, str):
        return frozenset(int(i) for i in text)
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise UsageError(f"--layers: {part!r} is not a layer number or range like 4-6")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise UsageError(f"--layers: range {part!r} runs backwards")
        if hi > MAX_LAYER_INDEX:  # bound the set before building it: no model has that many layers
            raise UsageError(f"--layers: layer {hi} is beyond any model (at most {MAX_LAYER_INDEX})")
        layers.update(range(lo, hi + 1))
    return frozenset(layers)


def format_layers(layers) -> str:
    """``{4, 5, 6, 9}`` -> ``"4-6,9"`` (for reports and model cards)."""
    items = sorted(layers)
    parts: list[str] = []
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        parts.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(parts)
