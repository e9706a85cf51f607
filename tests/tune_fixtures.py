"""A tiny (base, harmful, target) triple of transformers folders for the ``tune`` tests.

theta_b is the tiny random Llama of :mod:`eval_fixtures` (with its word-level tokenizer and chat
template); theta_H = theta_b + a random harm vector tau; theta_t = theta_b + c * tau + noise, so
that the target moved along the harm direction as an SFT that lost safety would. Weights are
stored in bfloat16 so that the final rounding to the checkpoint dtype is exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch

from eval_fixtures import make_model, make_tokenizer, write_prompt_files  # noqa: F401


def write_triple(root: Path, *, dtype: torch.dtype = torch.bfloat16, drift: float = 0.6, seed: int = 0) -> dict[str, Path]:
    """Folders ``base``, ``harmful``, ``target`` under ``root`` (safetensors, tokenizer, chat template)."""
    tokenizer = make_tokenizer()
    base = make_model(seed)
    generator = torch.Generator().manual_seed(seed + 100)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    tau = {k: torch.randn(v.shape, generator=generator) * 0.05 * (v.float().std() + 1e-3) * 10 for k, v in state.items()}
    noise = {k: torch.randn(v.shape, generator=generator) * 0.01 for k, v in state.items()}
    folders = {}
    for name, values in (
        ("base", state),
        ("harmful", {k: v + tau[k] for k, v in state.items()}),
        ("target", {k: v + drift * tau[k] + noise[k] for k, v in state.items()}),
    ):
        model = make_model(seed)
        model.load_state_dict({k: v.to(torch.float32) for k, v in values.items()})
        model = model.to(dtype)
        model.generation_config.eos_token_id = 2
        model.generation_config.pad_token_id = 3
        folder = Path(root) / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = folder
    return folders
