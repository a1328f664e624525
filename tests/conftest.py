"""Shared fixtures: tiny real Hugging Face models written to disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

TINY_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=48, max_position_embeddings=40, type_vocab_size=2)


def save_state(folder: Path, state: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    """Write a state dict as an HF-style folder (model.safetensors + config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def bert_zoo(tmp_path_factory) -> dict:
    """A tiny random BertModel base and three fine-tunes (low-rank + noise task vectors).

    Each fine-tune also has a task-specific head ``classifier.weight/bias`` with a
    different number of classes, absent from the base.
    """
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bert_zoo")
    torch.manual_seed(0)
    config = BertConfig(**TINY_BERT)
    base_model = BertModel(config)
    base_model.save_pretrained(root / "base")
    (root / "base" / "tokenizer_config.json").write_text('{"model_max_length": 40}')
    base = load_file(str(root / "base" / "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    models = []
    for t, classes in enumerate((2, 3, 5)):
        state = {}
        for name, w in base.items():
            if not w.dtype.is_floating_point:
                state[name] = w.clone()
            elif w.dim() == 2:
                m, n = w.shape
                a = torch.randn(m, 2, generator=gen) @ torch.randn(2, n, generator=gen)
                state[name] = w + 0.02 * a + 0.002 * torch.randn(m, n, generator=gen)
            else:
                state[name] = w + 0.01 * torch.randn(w.shape, generator=gen)
        state["classifier.weight"] = torch.randn(classes, TINY_BERT["hidden_size"], generator=gen)
        state["classifier.bias"] = torch.zeros(classes)
        models.append(save_state(root / f"task{t}", state, config.to_dict()))
    return {"root": root, "base": root / "base", "models": models, "config": config}


@pytest.fixture(scope="session")
def zoo(bert_zoo):
    """The ``bert_zoo`` paths with its base and model state dicts loaded."""
    base = load_file(str(bert_zoo["base"] / "model.safetensors"))
    models = [load_file(str(m / "model.safetensors")) for m in bert_zoo["models"]]
    return {"paths": bert_zoo, "base": base, "models": models}
