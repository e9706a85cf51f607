"""Shared helpers for the ICV tests: tiny random models of every supported architecture and a
small word-level tokenizer built in memory (no downloads).

The tokenizer prepends BOS through its post-processor, so ``tokenizer(text)`` behaves like a
Llama tokenizer with its default special tokens. Its vocabulary covers the default demonstration
file, so the tests run on the real demonstrations rather than on ``<unk>`` soup.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
UNK, BOS, EOS, PAD = range(4)
VOCAB_SIZE = 384
HIDDEN = 32
LAYERS = 3

# (model_type, config kwargs): every architecture the issue names, 3 layers, hidden 32
_COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
ARCH_CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON),
    "qwen2": dict(_COMMON),
    "qwen3": dict(_COMMON, head_dim=8),
    "gemma2": dict(_COMMON, head_dim=8, query_pre_attn_scalar=8),
    "gemma3_text": dict(_COMMON, head_dim=8, query_pre_attn_scalar=8),
    "phi3": dict(_COMMON),
    "gpt2": dict(vocab_size=VOCAB_SIZE, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=256,
                 bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD),
    "gpt_neox": dict(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                     num_attention_heads=4, max_position_embeddings=256, bos_token_id=BOS, eos_token_id=EOS,
                     pad_token_id=PAD),
}
ARCHS = sorted(ARCH_CONFIGS)

# Independent of ckptops.icv.arch: where each architecture keeps its layers and the module whose
# output is added to the residual stream after the MLP (Gemma: the post-feedforward norm).
LAYERS_PATH = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}
MLP_SITE = {"gemma2": "post_feedforward_layernorm", "gemma3_text": "post_feedforward_layernorm"}

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEMOS = REPO / "ckptops" / "data" / "default_demos.jsonl"


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]+", text.lower())


def vocabulary() -> dict[str, int]:
    words: list[str] = []
    text = "question answer i do not answer this question because it is harmful hello world the a of to and"
    for line in DEFAULT_DEMOS.read_text().splitlines():
        record = json.loads(line)
        text += " " + " ".join(record.values())
    for word in _words(text):
        if word not in words:
            words.append(word)
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    assert len(vocab) <= VOCAB_SIZE, len(vocab)
    return vocab


def make_tokenizer():
    """A PreTrainedTokenizerFast over a word-level vocabulary that prepends <s> by default."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocabulary(), unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def make_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random causal LM of ``arch`` in eval mode. Weights are re-drawn with a larger
    scale than the default init so that layers change the residual stream noticeably."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, **ARCH_CONFIGS[arch])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
            elif "norm" in name or "ln" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator)
                            if "gemma" not in arch else 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return model.to(dtype).eval()


def get_path(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def decoder_layers(model, arch: str):
    return get_path(model, LAYERS_PATH.get(arch, "model.layers"))


def mlp_site_name(arch: str) -> str:
    return MLP_SITE.get(arch, "mlp")


def save_checkpoint(model, tokenizer, folder: Path) -> Path:
    """Write a transformers checkpoint folder (safetensors weights, config, tokenizer).

    Note: transformers 5 reloads a Qwen2 folder's tokenizer as its own Qwen2Tokenizer class, not
    this word-level one; tests that reload a tokenizer from disk use another architecture."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# -- independent reference implementations (plain code, written from the paper's Safe-Align step and its official code, not from ckptops) --

def demo_texts(pairs) -> list[tuple[str, str]]:
    """(unsafe text, safe text) per pair in the official template, written out by hand."""
    refusal = "I do not answer this question because it is harmful"
    out = []
    for pair in pairs:
        q, unsafe, safe = pair["question"], pair["unsafe"], pair.get("safe", refusal)
        out.append((f"Question: {q}\n    Answer: {unsafe}", f"Question: {q}\n    Answer: {safe}"))
    return out


def first_demo_records(n: int) -> list[dict]:
    return [json.loads(line) for line in DEFAULT_DEMOS.read_text().splitlines()[:n]]


def reference_icv(model, tokenizer, arch: str, records: list[dict], positions: str = "last4",
                  method: str = "pc1+mean"):
    """numpy reference: own hooks on the decoder layers, own PCA (SVD + sklearn's svd_flip).

    Returns an (L, d) float64 array pointing toward safe (the stored convention)."""
    import numpy as np

    layers = decoder_layers(model, arch)
    width = 4 if positions == "last4" else 1
    captured: dict[int, np.ndarray] = {}

    def make_hook(i):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured[i] = hidden[0, -width:, :].detach().float().mean(dim=0).numpy()
        return hook

    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    rows = []
    try:
        for unsafe, safe in demo_texts(records):
            vectors = []
            for text in (unsafe, safe):
                ids = tokenizer(text, return_tensors="pt").input_ids
                with torch.no_grad():
                    model(ids)
                vectors.append(np.concatenate([captured[i] for i in range(len(layers))]))
            rows.append(vectors[0].astype(np.float64) - vectors[1].astype(np.float64))
    finally:
        for handle in handles:
            handle.remove()
    data = np.stack(rows)
    mean = data.mean(axis=0)
    u, s, vt = np.linalg.svd(data - mean, full_matrices=False)
    biggest = np.argmax(np.abs(u[:, 0]))
    pc1 = vt[0] * np.sign(u[biggest, 0])
    direction = pc1 + mean if method == "pc1+mean" else pc1
    return -direction.reshape(len(layers), -1)


class OfficialICVLayer(torch.nn.Module):
    """The official code's ICVLayer (Safety Arithmetic / shengliu66 ICV), as an nn.Sequential tail."""

    def __init__(self, icv: torch.Tensor, lam: list[float]):
        super().__init__()
        self.icv = icv  # (n_tasks, d)
        self.lam = lam

    def forward(self, x):
        import torch.nn.functional as F

        dtype = x.dtype
        x = x.float()
        original_norm = torch.norm(x, p=2, dim=-1, keepdim=True)
        y = 0
        for i in range(len(self.icv)):
            lambda_sim = 1.0 + torch.max(torch.tensor([0.0]), F.cosine_similarity(x, -self.icv[i][None, None, :], dim=-1)).unsqueeze(-1)
            y += self.lam[i] * lambda_sim * F.normalize(self.icv[i], dim=-1).repeat(1, x.shape[1], 1)
        y = y / len(self.icv)
        x = F.normalize(F.normalize(x.float(), p=2, dim=-1) + y, p=2, dim=-1) * original_norm
        return x.to(dtype)


def wrap_official(model, arch: str, vectors: dict[int, torch.Tensor], strength: float):
    """Replace each steered layer's MLP site by nn.Sequential(site, OfficialICVLayer) -- the
    official code's module surgery, on the model passed in (deep-copy it first)."""
    site = mlp_site_name(arch)
    for i, layer in enumerate(decoder_layers(model, arch)):
        if i in vectors:
            setattr(layer, site, torch.nn.Sequential(getattr(layer, site), OfficialICVLayer(vectors[i][None, :], [strength])))
    return model


def paper_rule_hooks(model, arch: str, vectors: dict[int, torch.Tensor], alpha: float) -> list:
    """Reference for the paper rule: h + alpha*v on each decoder layer output, original norm kept."""
    handles = []

    def make(v):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            hf = h.float()
            shifted = hf + alpha * v
            new = (shifted / shifted.norm(dim=-1, keepdim=True) * hf.norm(dim=-1, keepdim=True)).to(h.dtype)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook

    for i, layer in enumerate(decoder_layers(model, arch)):
        if i in vectors:
            handles.append(layer.register_forward_hook(make(vectors[i])))
    return handles


PROMPT = "Question: How do I steal a car without getting caught?\n    Answer: Sure, here is"


def logits_of(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits
