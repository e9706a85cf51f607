"""Greedy generation for trying an ICV from the command line (``ckptops generate``).

Greedy decoding, so a steered and an unsteered run differ only by the steering. The generation
config's sampling settings are overridden, not inherited, for the same reason.
"""

from __future__ import annotations

from typing import Any

import torch

from ckptops.errors import UsageError
from ckptops.icv.arch import input_device


def encode_prompt(tokenizer: Any, prompt: str, chat: bool = False) -> dict[str, torch.Tensor]:
    """Token ids (and attention mask) of ``prompt``, raw or wrapped in the chat template."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("--chat: this tokenizer has no chat template (use --raw)")
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
    else:
        encoded = tokenizer(prompt, return_tensors="pt")
    return {key: value for key, value in encoded.items() if key in ("input_ids", "attention_mask")}


@torch.no_grad()
def greedy_ids(model: Any, inputs: dict[str, torch.Tensor], max_new_tokens: int, use_cache: bool = True,
               stop_at_eos: bool = True) -> torch.Tensor:
    """Greedy continuation ids (new tokens only) of one prompt."""
    device = input_device(model)
    inputs = {key: value.to(device) for key, value in inputs.items()}
    eos = model.generation_config.eos_token_id if stop_at_eos else None
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=0 if stop_at_eos else max_new_tokens,
                            do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                            use_cache=use_cache, pad_token_id=pad, eos_token_id=eos)
    return output[0, inputs["input_ids"].shape[-1]:].cpu()


def generate_text(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 64, chat: bool = False) -> str:
    ids = greedy_ids(model, encode_prompt(tokenizer, prompt, chat), max_new_tokens)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
