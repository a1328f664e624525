"""A tiny real Llama zoo on disk for the parameter-language and mergekit-recipe tests: a random
LlamaForCausalLM base of four blocks (untied head, byte-level BPE tokenizer with ChatML's special
tokens) and fine-tunes θ_t = θ₀ + 0.02·N(0, 1), each a full model folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llm_fixtures import TINY_LLAMA, byte_level_tokenizer, vocabulary

BLOCKS = 4


def build_llama_zoo(root: Path, models: int = 3) -> dict[str, Path]:
    """``{"base": folder, "ft0": folder, ...}`` under ``root``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocabulary()[0]), tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, **{**TINY_LLAMA, "num_hidden_layers": BLOCKS})
    base = root / "base"
    LlamaForCausalLM(config).save_pretrained(base)
    byte_level_tokenizer().save_pretrained(base)
    state = load_file(str(base / "model.safetensors"))
    zoo = {"base": base}
    for k in range(models):
        g = torch.Generator().manual_seed(100 + k)
        folder = root / f"ft{k}"
        shutil.copytree(base, folder)
        save_file({n: v + 0.02 * torch.randn(v.shape, generator=g) for n, v in state.items()},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
        zoo[f"ft{k}"] = folder
    return zoo


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (all its safetensors shards)."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out
