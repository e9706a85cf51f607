"""Compute the safety in-context vector from demonstration pairs, exactly as the official code does.

For every pair, the unsafe and the safe demonstration are run through the model one sequence per
forward pass (no padding, so nothing depends on batch composition). A forward hook on each decoder
layer reads that layer's residual-stream output -- not ``output_hidden_states``, whose last entry
is the post-final-norm state -- and pools it in float32 over the last 4 positions (``last4``,
official) or the last token (``last``, the paper). Concatenated over layers this is h ∈ R^(L·d).

With d_i = h(unsafe_i) − h(safe_i), a centred one-component PCA by SVD gives PC1, its sign fixed
by sklearn's ``svd_flip`` rule (the largest-magnitude entry of the left singular vector is
positive). The direction is PC1 + mean(d) (official) or PC1 alone (paper); it points toward
*unsafe*, so its negation -- toward safe -- is what the file stores.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch
from torch import nn

from ckptops.errors import ICVError, UsageError
from ckptops.icv.arch import DecoderLayout, find_decoder_layout, input_device
from ckptops.icv.demos import DemoPair, PairsLike, check_demo_lengths, coerce_pairs, demos_sha256
from ckptops.icv.file import ICV, METHODS, POSITIONS, check_alpha, get_rule

_POOL_WIDTH = {"last4": 4, "last": 1}


def pool_positions(hidden: torch.Tensor, positions: str) -> torch.Tensor:
    """Mean over the last 4 positions (or the last one) of a (1, seq, d) tensor, in float32."""
    width = _POOL_WIDTH[positions]
    return hidden[0, -width:, :].float().mean(dim=0)


def pca_direction(diffs: torch.Tensor, method: str) -> torch.Tensor:
    """PC1 (+ mean) of the rows of ``diffs`` (n × D), with sklearn's svd_flip sign rule.

    Runs in float64 where the official code uses float32: the extra precision only removes
    rounding noise (it could matter only if the top two singular values were nearly equal, where
    PC1 is ill-defined anyway), and makes the result reproducible across devices.
    """
    data = diffs.to(torch.float64)
    mean = data.mean(dim=0)
    centred = data - mean
    u, s, vh = torch.linalg.svd(centred, full_matrices=False)
    if s.numel() == 0 or float(s[0]) <= 1e-12 * max(1.0, float(data.abs().max())):
        raise ICVError("the demonstration differences have no variance (are all pairs identical?); need at least 2 distinct pairs")
    column = u[:, 0]
    sign = torch.sign(column[torch.argmax(column.abs())])
    pc1 = vh[0] * sign
    return pc1 + mean if method == "pc1+mean" else pc1


class _LayerReader:
    """Forward hooks that pool each decoder layer's residual output of the current sequence."""

    def __init__(self, layout: DecoderLayout, positions: str) -> None:
        self.pooled: list[torch.Tensor | None] = [None] * layout.num_layers
        self._handles = [
            layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layout.layers)
        ]
        self._positions = positions

    def _hook(self, index: int) -> Callable:
        def read(module: nn.Module, args, output) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            self.pooled[index] = pool_positions(hidden.detach(), self._positions).to("cpu")

        return read

    def take(self) -> torch.Tensor:
        if any(p is None for p in self.pooled):
            missing = [i for i, p in enumerate(self.pooled) if p is None]
            raise ICVError(f"decoder layers {missing} did not run during the forward pass")
        h = torch.cat(self.pooled)  # type: ignore[arg-type]
        self.pooled = [None] * len(self.pooled)
        return h

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _MLPNormReader:
    """Forward hooks on each layer's MLP site that record the norm of every token's MLP output.

    The additive rule adds s·m_l·v/‖v‖ to layer l's MLP output, where m_l is the *median* of these
    per-token norms over all demonstration sequences: a typical size of what that layer adds to
    the residual stream, robust to the few huge outputs some models produce at the first token.
    Expressing the strength relative to m_l is what keeps one default α sensible across layers
    and models (an absolute α·v broke SmolLM2-135M in llama.cpp, see docs/icv.md)."""

    def __init__(self, layout: DecoderLayout) -> None:
        self.norms: list[list[torch.Tensor]] = [[] for _ in range(layout.num_layers)]
        self._handles = [layout.mlp_site(i).register_forward_hook(self._hook(i)) for i in range(layout.num_layers)]

    def _hook(self, index: int) -> Callable:
        def read(module: nn.Module, args, output) -> None:
            x = output[0] if isinstance(output, (tuple, list)) else output
            self.norms[index].append(torch.linalg.vector_norm(x.detach().float(), dim=-1).reshape(-1).to("cpu"))

        return read

    def medians(self) -> dict[int, float]:
        return {i: float(torch.cat(values).to(torch.float64).median()) for i, values in enumerate(self.norms) if values}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _check_options(positions: str, method: str) -> None:
    if positions not in POSITIONS:
        raise UsageError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    if method not in METHODS:
        raise UsageError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def _check_layers(layers: Iterable[int] | None, num_layers: int) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    chosen = sorted(set(int(i) for i in layers))
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad or not chosen:
        raise UsageError(f"layers {bad or '(none)'} are not in 0..{num_layers - 1} (the model has {num_layers} decoder layers)")
    return chosen


def _model_dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(model.parameters()).dtype


@torch.no_grad()
def hidden_states_of(model: nn.Module, tokenizer, text: str, reader: _LayerReader, device: torch.device) -> torch.Tensor:
    """Run one demonstration (its own forward pass) and return its pooled h ∈ R^(L·d)."""
    encoded = tokenizer(text, return_tensors="pt")
    input_ids = encoded["input_ids"].to(device)
    if input_ids.shape[-1] == 0:
        raise ICVError(f"the tokenizer produced no tokens for {text[:40]!r}")
    attention_mask = encoded.get("attention_mask")
    kwargs = {"attention_mask": attention_mask.to(device)} if attention_mask is not None else {}
    body = getattr(model, "base_model", model)  # the decoder stack: skip the LM head's logits
    body(input_ids=input_ids, use_cache=False, **kwargs)
    return reader.take()


def compute_icv(
    model: nn.Module,
    tokenizer,
    pairs: PairsLike = None,
    positions: str = "last4",
    method: str = "pc1+mean",
    layers: Iterable[int] | None = None,
    *,
    rule: str = "official",
    alpha: float | None = None,
    progress: bool | None = None,
    source: str | None = None,
    source_sha256: str = "",
) -> ICV:
    """Compute the safety ICV of ``model`` from demonstration ``pairs``.

    Args:
        model: a transformers causal LM, ideally loaded in float32 (the official code's precision);
            another dtype works but is recorded and warned about. Accelerate device maps and disk
            offload work (see :func:`ckptops.icv.load.load_model`).
        tokenizer: its tokenizer; demonstrations are tokenized with its default special tokens.
        pairs: None (the shipped default file), a JSON-lines path, or DemoPairs / dicts / tuples.
        positions: ``"last4"`` (official: mean of the last 4 tokens) or ``"last"`` (paper).
        method: ``"pc1+mean"`` (official) or ``"pc1"`` (paper).
        layers: decoder layers to keep in the file (e.g. an edited model's edit area); the PCA is
            fit over all layers, as the official code computes one vector for the whole model.
        rule, alpha: how the file says it should be applied (``"official"``, ``"paper"`` or
            ``"additive"``; α defaults to 0.12). Every file also records each layer's typical
            MLP-output norm, so any of them can later be applied with the additive rule.
        progress: show a tqdm bar (None: only when stderr is a terminal).
        source, source_sha256: identity of the checkpoint, recorded in the file.

    Returns:
        An :class:`~ckptops.icv.file.ICV` whose vectors point toward safe.

    Example::

        icv = ckptops.compute_icv(model, tokenizer, "recipes/default_demos.jsonl")
        icv.save("icv.safetensors")
    """
    from tqdm.auto import tqdm

    _check_options(positions, method)
    rule_info = get_rule(rule)
    demo_pairs: list[DemoPair] = coerce_pairs(pairs)
    if len(demo_pairs) < 2:
        raise ICVError(f"need at least 2 demonstration pairs for the PCA, got {len(demo_pairs)}")
    layout = find_decoder_layout(model)
    kept = _check_layers(layers, layout.num_layers)
    from ckptops.evaluate.generate import context_window

    check_demo_lengths(demo_pairs, tokenizer, context_window(model))
    dtype = _model_dtype(model)
    if dtype != torch.float32:
        warnings.warn(
            f"computing the ICV with a {str(dtype).removeprefix('torch.')} model; the official code runs in "
            "float32 (load with dtype=torch.float32 for an exact reproduction)",
            stacklevel=2,
        )
    was_training = model.training
    model.eval()
    device = input_device(model)
    reader = _LayerReader(layout, positions)
    norm_reader = _MLPNormReader(layout)
    diffs = []
    bar = tqdm(total=2 * len(demo_pairs), desc="icv: forward passes", unit="seq",
               disable=(None if progress is None else not progress), leave=False)
    try:
        for pair in demo_pairs:
            h_unsafe = hidden_states_of(model, tokenizer, pair.unsafe_text(), reader, device)
            bar.update(1)
            h_safe = hidden_states_of(model, tokenizer, pair.safe_text(), reader, device)
            bar.update(1)
            diffs.append(h_unsafe - h_safe)
    finally:
        bar.close()
        reader.remove()
        norm_reader.remove()
        model.train(was_training)
    stacked = torch.stack(diffs)
    if not bool(torch.isfinite(stacked).all()):
        raise ICVError("the model produced NaN or Inf hidden states on the demonstrations")
    toward_unsafe = pca_direction(stacked, method).to(torch.float32)
    norms = norm_reader.medians()
    if len(norms) != layout.num_layers:
        raise ICVError(f"the MLP blocks of layers {sorted(set(range(layout.num_layers)) - set(norms))} did not run")
    per_layer = (-toward_unsafe).reshape(layout.num_layers, layout.hidden_size)
    config = getattr(model, "config", None)
    return ICV(
        vectors={i: per_layer[i].clone() for i in kept},
        hidden_size=layout.hidden_size,
        num_layers=layout.num_layers,
        rule=rule_info.name,
        alpha=rule_info.default_alpha if alpha is None else check_alpha(alpha),
        scale_factor=rule_info.scale_factor,
        method=method,
        positions=positions,
        num_demos=len(demo_pairs),
        demos_sha256=demos_sha256(demo_pairs),
        model_type=layout.model_type,
        source=source if source is not None else str(getattr(config, "_name_or_path", "") or ""),
        source_sha256=source_sha256,
        extra={"compute_dtype": str(dtype).removeprefix("torch."), "layers_path": layout.layers_path,
               "mlp_site": layout.mlp_site_name},
        mlp_norms={i: norms[i] for i in kept},
    )
