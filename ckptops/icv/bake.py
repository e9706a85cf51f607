"""Bake an additive-rule ICV into a checkpoint's weights, so every runtime serves it (``icv bake``).

vLLM, SGLang, MLX, Ollama and llama.cpp load weights, not forward hooks. The additive rule adds
the same vector u_l = s·m_l·v_l/‖v_l‖ to layer l's MLP output at every position, and in a
Llama-type block that output is ``down_proj(act(gate_proj(x)) * up_proj(x))``, added straight to
the residual stream. So the additive rule *is* ``down_proj.bias = u_l``: transformers' Llama
creates that bias (and gate/up biases, written as zeros) when ``config.mlp_bias`` is true, and
vLLM, MLX and llama.cpp's converter read it. Unsteered layers get zero biases.

Exact only where that holds; everything else is refused with one line that says why:

* **llama**: baked as is (``mlp_bias: true``).
* **mistral**: transformers' Mistral has no ``mlp_bias``; its block is Llama's plus an optional
  sliding window, so it is relabelled as Llama -- refused when a sliding window shorter than the
  model's positions is set (Llama has none, so long inputs would differ).
* **qwen2**: Llama with q/k/v biases and none on o_proj, plus optional sliding-window layers. It is
  relabelled as Llama with ``attention_bias: true`` and explicit zero o_proj biases (Llama's flag
  puts a bias on all four), refused when any layer uses a sliding window.
* post-norm blocks (Gemma 2/3, OLMo 2: the MLP output passes a norm before the residual add, so a
  bias is rescaled away), fused layouts (Phi-3 ``gate_up_proj``, GPT-2, GPT-NeoX) and anything
  else: refused.
* an ICV file whose rule is not additive: the official and paper rules renormalise, which no bias
  expresses; recompute with ``--rule additive``.

Every input tensor is copied byte for byte through the streaming writer (bounded memory, shards
like the input's, index, atomic publish), the biases are added next to their weights, and
``ckptops.json`` plus a model card record what was baked.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ckptops.checkpoint.resolve import Checkpoint, fingerprint, full_sha256, open_checkpoint
from ckptops.errors import CheckpointError, UsageError
from ckptops.icv.file import ICV, load_icv

BAKED_MODEL_TYPE = "llama"
BAKED_ARCHITECTURE = "LlamaForCausalLM"
_COPY_CHUNK = 64 << 20
_FLOAT_TORCH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

#: model types refused, with the reason printed
REFUSED = {
    "gemma2": "post-norm block: the MLP output passes post_feedforward_layernorm before the residual add, "
              "so a down_proj bias would be normalised away",
    "gemma3": "post-norm block: the MLP output passes post_feedforward_layernorm before the residual add, "
              "so a down_proj bias would be normalised away",
    "gemma3_text": "post-norm block: the MLP output passes post_feedforward_layernorm before the residual add, "
                   "so a down_proj bias would be normalised away",
    "olmo2": "post-norm block: the MLP output passes post_feedforward_layernorm before the residual add, "
             "so a down_proj bias would be normalised away",
    "phi3": "fused gate_up_proj layout with no MLP bias in transformers' Phi-3; it is not Llama up to renaming",
    "gpt2": "fused Conv1D layout (c_attn/c_fc); it is not Llama up to renaming",
    "gpt_neox": "fused query_key_value layout and parallel residual; it is not Llama up to renaming",
}
SUPPORTED = ("llama", "mistral", "qwen2")
#: config keys of the relabelled families that mean nothing to Llama once checked inactive
_DROPPED_KEYS = {
    "mistral": ("sliding_window",),
    "qwen2": ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types"),
}
_LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(mlp\.(gate|up|down)_proj|self_attn\.o_proj)\.weight")


@dataclass
class BakeReport:
    out: str
    model_type: str
    baked_as: str
    layers: list[int]
    strength: float
    alpha: float
    bias_tensors: int
    bytes_written: int
    seconds: float = 0.0
    dropped_config_keys: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _read_config(checkpoint: Checkpoint) -> dict:
    if checkpoint.root is None:
        raise CheckpointError(f"{checkpoint.ref}: baking needs a local checkpoint folder (download it first)")
    path = checkpoint.root / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a transformers checkpoint folder has config.json)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: is not a JSON object")
    return config


def baked_config(config: dict, where: str) -> tuple[dict, list[str]]:
    """The config of the baked folder (Llama with ``mlp_bias``), or UsageError saying why not.

    Returns the new config and the keys dropped from it (checked inactive first)."""
    model_type = str(config.get("model_type", ""))
    if model_type in REFUSED:
        raise UsageError(f"{where}: cannot bake an ICV into a {model_type} model: {REFUSED[model_type]}")
    if model_type not in SUPPORTED:
        raise UsageError(f"{where}: cannot bake an ICV into a {model_type or 'unknown'} model: baking is exact only "
                         f"for Llama-type blocks ({', '.join(SUPPORTED)})")
    text = config.get("text_config")
    if isinstance(text, dict):
        raise UsageError(f"{where}: cannot bake an ICV into a multimodal {model_type} checkpoint")
    if config.get("mlp_bias"):
        raise UsageError(f"{where}: this {model_type} model already has MLP biases; baking into existing biases "
                         "is not supported")
    positions = config.get("max_position_embeddings")
    new = dict(config)
    if model_type == "mistral":
        window = config.get("sliding_window")
        if window is not None and (not isinstance(positions, int) or window < positions):
            raise UsageError(f"{where}: cannot bake an ICV into this mistral model: its sliding window ({window} "
                             f"tokens) is shorter than its {positions} positions, and the Llama layout it must be "
                             "relabelled to has none, so long inputs would compute something else")
    if model_type == "qwen2":
        types = config.get("layer_types") or []
        if config.get("use_sliding_window") or any(t != "full_attention" for t in types):
            raise UsageError(f"{where}: cannot bake an ICV into this qwen2 model: it uses sliding-window attention, "
                             "which the Llama layout it must be relabelled to lacks")
        new["attention_bias"] = True  # q/k/v biases as before, plus zero o_proj biases
    elif model_type == "mistral":
        new["attention_bias"] = False
    dropped = [key for key in _DROPPED_KEYS.get(model_type, ()) if key in new]
    for key in dropped:
        del new[key]
    new["model_type"] = BAKED_MODEL_TYPE
    new["architectures"] = [BAKED_ARCHITECTURE]
    new["mlp_bias"] = True
    return new, dropped


@dataclass(frozen=True)
class NewTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    after: str  # the input tensor it is written next to
    layer: int | None  # the steered layer whose u_l it holds (None: zeros)


def plan_biases(checkpoint: Checkpoint, config: dict, icv: ICV, where: str) -> list[NewTensor]:
    """Every bias tensor the baked layout needs, each placed after its weight."""
    layers: dict[int, dict[str, object]] = {}
    for name, info in checkpoint.tensors.items():
        match = _LAYER_TENSOR.fullmatch(name)
        if match:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = info
    count = config.get("num_hidden_layers")
    if sorted(layers) != list(range(count if isinstance(count, int) else -1)):
        raise CheckpointError(f"{where}: expected model.layers.0..{count - 1 if isinstance(count, int) else '?'} "
                              "with mlp.gate_proj/up_proj/down_proj weights (a Llama-type layout)")
    hidden = config.get("hidden_size")
    icv.check_fits(hidden, count, f"{where} ({config.get('model_type')})")
    relabel_o = config.get("model_type") == "qwen2"
    new: list[NewTensor] = []
    for index in range(count):
        parts = layers[index]
        for proj in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") + (("self_attn.o_proj",) if relabel_o else ()):
            weight = parts.get(proj)
            if weight is None:
                raise CheckpointError(f"{where}: model.layers.{index}.{proj}.weight is missing")
            if weight.dtype not in _FLOAT_TORCH:
                raise CheckpointError(f"{where}: model.layers.{index}.{proj}.weight is {weight.dtype}; baking needs "
                                      "float32, float16 or bfloat16 weights (not a quantized checkpoint)")
            bias = f"model.layers.{index}.{proj}.bias"
            if bias in checkpoint.tensors:
                raise CheckpointError(f"{where}: {bias} exists already, although the config has no such bias")
            steered = proj == "mlp.down_proj" and index in icv.vectors
            new.append(NewTensor(bias, weight.dtype, (weight.shape[0],), weight.name, index if steered else None))
    return new


def _bias_bytes(icv: ICV, tensor: NewTensor):
    import torch

    dtype = getattr(torch, _FLOAT_TORCH[tensor.dtype])
    if tensor.layer is None:
        values = torch.zeros(tensor.shape, dtype=dtype)
    else:
        values = icv.additive_shift(tensor.layer).to(dtype)
    return values.contiguous().view(torch.uint8).numpy()


def _copy_tensor(checkpoint: Checkpoint, info, writer, progress) -> None:
    fd = os.open(checkpoint.shard_path(info.shard), os.O_RDONLY)
    try:
        done = 0
        while done < info.nbytes:
            size = min(_COPY_CHUNK, info.nbytes - done)
            data = os.pread(fd, size, info.offset + done)
            if len(data) != size:
                raise CheckpointError(f"{info.shard}: ends early while reading {info.name}")
            writer.write(info.name, done, data)
            done += size
            progress.update(size)
    finally:
        os.close(fd)


def bake_icv(model: str | os.PathLike, out: str | os.PathLike, icv: ICV | str | os.PathLike | None = None, *,
             alpha: float | None = None, overwrite: bool = False, title: str | None = None,
             progress: bool | None = None) -> BakeReport:
    """Write ``out``: ``model`` with the additive-rule ICV baked into ``down_proj`` biases.

    ``icv`` defaults to ``model/icv.safetensors``; ``alpha`` overrides its α. The folder loads in
    stock transformers (``AutoModelForCausalLM.from_pretrained(out)``), vLLM and MLX as a Llama
    model and computes what ``apply_icv(model, icv, rule="additive")`` computes.

    Example::

        ckptops.icv.bake.bake_icv("llama-safe", "llama-safe-baked")
    """
    from ckptops import __version__
    from ckptops.checkpoint.card import render_card
    from ckptops.checkpoint.publish import check_destination, copy_side_files, staging_folder, write_index
    from ckptops.checkpoint.side_files import check_side_files
    from ckptops.checkpoint.writer import OutTensor, ShardWriter, layout_like_target
    from ckptops.hdr.layers import format_layers
    from ckptops.progress import ByteProgress

    started = time.perf_counter()
    checkpoint = open_checkpoint(model)
    where = checkpoint.ref
    icv_path = None
    if icv is None:
        if checkpoint.root is None or not (checkpoint.root / "icv.safetensors").is_file():
            raise UsageError(f"{where}: holds no icv.safetensors; pass --icv FILE")
        icv_path = checkpoint.root / "icv.safetensors"
        icv = icv_path
    if not isinstance(icv, ICV):
        icv_path = Path(icv)
        icv = load_icv(icv_path)
    icv_name = str(icv_path) if icv_path is not None else "ICV"
    if icv.rule != "additive":
        raise UsageError(f"{icv_name}: uses the {icv.rule} rule, which renormalises each token's state and cannot be "
                         "a bias; compute one with `ckptops icv compute --rule additive` to bake it")
    if alpha is not None:
        icv = icv.with_application(alpha=alpha)
    icv.require_norms(icv_name)
    check_side_files(checkpoint, config=False)  # (config.json is read below and written anew)
    config = _read_config(checkpoint)
    new_config, dropped = baked_config(config, where)
    biases = plan_biases(checkpoint, config, icv, where)
    roots = [checkpoint.root] if checkpoint.root is not None else []
    if icv_path is not None:  # --overwrite of a folder holding the --icv file would delete it
        roots.append(icv_path)
    out_path = check_destination(Path(out), roots, overwrite)

    after: dict[str, list[NewTensor]] = {}
    for bias in biases:
        after.setdefault(bias.after, []).append(bias)
    ordered: list[tuple[OutTensor, str]] = []
    for name, info in checkpoint.tensors.items():
        ordered.append((OutTensor(name, info.dtype, tuple(info.shape)), info.shard))
        for bias in after.get(name, []):
            ordered.append((OutTensor(bias.name, bias.dtype, bias.shape), info.shard))
    shards = layout_like_target(ordered)
    parameters = {
        "method": "icv-bake",
        "rule": "additive",
        "alpha": icv.alpha,
        "scale_factor": icv.scale_factor,
        "strength": icv.strength,
        "layers": format_layers(icv.layers),
        "model_type": config.get("model_type"),
        "baked_as": BAKED_MODEL_TYPE,
        "dropped_config_keys": dropped,
        "ckptops_version": __version__,
    }
    identity = dict(checkpoint.identity)
    identity["ref"] = checkpoint.ref
    if identity.get("type") == "local" or checkpoint.root is not None:
        identity.setdefault("type", "local")
        identity["hash_kind"] = "sampled sha256"
        identity["sha256"] = fingerprint(checkpoint)
    icv_identity = {"ref": icv_path.name if icv_path is not None else "", "demos_sha256": icv.demos_sha256,
                    "source_sha256": icv.source_sha256, "mlp_output_norms": {str(i): icv.mlp_norms[i] for i in icv.layers}}
    if icv_path is not None:
        icv_identity["sha256"] = full_sha256(icv_path)
    previous = None
    if checkpoint.root is not None and (checkpoint.root / "ckptops.json").is_file():
        try:
            previous = json.loads((checkpoint.root / "ckptops.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None

    total = sum(info.nbytes for info in checkpoint.tensors.values())
    with staging_folder(out_path, overwrite) as folder:
        writer = ShardWriter(folder, shards, {"format": "pt", "producer": f"ckptops {__version__}"}, direct=False)
        try:
            with ByteProgress(total, "bake: copy + biases", progress) as bar:
                for info in checkpoint.tensors.values():
                    _copy_tensor(checkpoint, info, writer, bar)
                for bias in biases:
                    writer.write(bias.name, 0, _bias_bytes(icv, bias))
            writer.finish()
        finally:
            writer.close()
        write_index(folder, writer.weight_map(), writer.total_bytes())
        side = {name: path for name, path in checkpoint.side_files().items()
                if name not in ("config.json", "ckptops.json")}
        copy_side_files(side, folder)
        (folder / "config.json").write_text(json.dumps(new_config, indent=2) + "\n", encoding="utf-8")
        provenance = {"tool": f"ckptops {__version__}", "title": title or Path(out_path).name,
                      "parameters": parameters, "inputs": {"model": identity, "icv": icv_identity}}
        if previous is not None:
            provenance["previous"] = previous
        (folder / "ckptops.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        (folder / "README.md").write_text(render_card(provenance), encoding="utf-8")
        report = BakeReport(out=str(out_path), model_type=str(config.get("model_type")), baked_as=BAKED_MODEL_TYPE,
                            layers=icv.layers, strength=icv.strength, alpha=icv.alpha, bias_tensors=len(biases),
                            bytes_written=writer.total_bytes(), dropped_config_keys=dropped)
    report.seconds = time.perf_counter() - started
    return report
