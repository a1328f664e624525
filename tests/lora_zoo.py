"""Real PEFT LoRA adapters of a tiny BERT, and the same fine-tunes materialised by peft.

Import the fixtures into a test module (``from lora_zoo import lora_zoo``). Everything is seeded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")

TINY_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=48, max_position_embeddings=40, type_vocab_size=2)

#: Three adapters covering what the reader must handle: plain LoRA; rsLoRA with rank and alpha
#: patterns, non-square targets and an embedding LoRA; a LoRA with modules_to_save and trained
#: biases of its LoRA layers (bias: lora_only).
ADAPTERS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
    "rslora": dict(r=6, lora_alpha=4, use_rslora=True, target_modules=["query", "key", "dense", "word_embeddings"],
                   rank_pattern={"intermediate.dense": 2}, alpha_pattern={"layer.1.attention.self.key": 12}),
    "saved": dict(r=2, lora_alpha=2, target_modules=["value", "output.dense"], bias="lora_only",
                  modules_to_save=["pooler.dense", "embeddings.LayerNorm"]),
}


def bert_base(folder: Path):
    """A seeded random BertModel saved to ``folder``; returns the model."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY_BERT)).eval()
    model.save_pretrained(folder)
    return model


def randomise(model, seed: int, scale: float = 0.2) -> None:
    """peft starts lora_B at zero (τ = 0): give every trainable tensor random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=gen) * scale
                p.copy_(p + 0.05 * noise if ("modules_to_save" in name or name.endswith("bias")) else noise)


def make_adapter(base_folder: Path, out: Path, config: dict, seed: int, full_out: Path | None = None) -> Path:
    """Train-free adapter: peft LoRA on the base with random factors, saved with save_pretrained.
    With ``full_out``, also save peft's merge_and_unload() of it as a full fine-tune."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    model = get_peft_model(BertModel.from_pretrained(base_folder), LoraConfig(lora_dropout=0.0, **config))
    randomise(model, seed)
    model.save_pretrained(out)
    if full_out is not None:
        model.merge_and_unload().save_pretrained(full_out)
    return out


@pytest.fixture(scope="session")
def lora_zoo(tmp_path_factory) -> dict:
    """base/, adapters/<name>/ and full/<name>/ (peft's merge_and_unload of the same adapter)."""
    root = tmp_path_factory.mktemp("lora_zoo")
    bert_base(root / "base")
    adapters, full = {}, {}
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        adapters[name] = make_adapter(root / "base", root / "adapters" / name, config, seed,
                                      root / "full" / name)
        full[name] = root / "full" / name
    return {"root": root, "base": root / "base", "adapters": adapters, "full": full}


def state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def edit_adapter(src: Path, dst: Path, config: dict | None = None, drop: str | None = None,
                 raw_config: str | None = None) -> Path:
    """Copy an adapter folder, changing config fields, dropping weight keys containing ``drop``,
    or writing ``raw_config`` as the config text."""
    from safetensors.torch import save_file

    dst.mkdir(parents=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(raw_config if raw_config is not None else json.dumps(cfg))
    weights = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: v for k, v in weights.items() if drop is None or drop not in k},
              str(dst / "adapter_model.safetensors"))
    return dst
