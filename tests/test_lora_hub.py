"""LoRA adapters named by Hub reference (through the local FakeHub): the same bytes as the run on
local folders, for --harmful ADAPTER and --target BASE+ADAPTER."""

from __future__ import annotations

from pathlib import Path

import torch

import ckptops
from hub_server import hub, hub_environment  # noqa: F401  (fixture)
from icv_fixtures import make_model, make_tokenizer, save_checkpoint


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_hub_adapter_runs_like_the_local_folder(hub, tmp_path):
    from peft import LoraConfig, get_peft_model

    tokenizer = make_tokenizer()
    base = save_checkpoint(make_model("llama", seed=0), tokenizer, tmp_path / "base")
    target = save_checkpoint(make_model("llama", seed=3), tokenizer, tmp_path / "target")
    torch.manual_seed(0)
    peft_model = get_peft_model(make_model("llama", seed=0), LoraConfig(r=2, target_modules=["q_proj", "down_proj"],
                                                                        init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    for repo, folder in (("org/base", base), ("org/adapter", adapter), ("org/target", target)):
        hub.add_folder(repo, folder)

    ckptops.sanitize(base, adapter, target, tmp_path / "local-h", progress=False)
    ckptops.sanitize("org/base", "org/adapter", "org/target", tmp_path / "hub-h", progress=False)
    assert _files(tmp_path / "hub-h") == _files(tmp_path / "local-h")

    ckptops.sanitize(base, target, f"{base}+{adapter}", tmp_path / "local-t", progress=False)
    report = ckptops.sanitize("org/base", "org/target", "org/base+org/adapter", tmp_path / "hub-t", progress=False)
    assert _files(tmp_path / "hub-t") == _files(tmp_path / "local-t")
    assert report.inputs["target"]["type"] == "base+lora-adapter"
    assert report.inputs["target"]["base"]["type"] == "hub"
