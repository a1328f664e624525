"""LiNeS post-scaling: the layer schedule and its application to any method's output."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import primerge
from primerge.util.errors import RecipeError
from primerge.methods.lines_scaling import LinesConfig, layer_scales


def test_layer_scales_hand_case():
    names = ["embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
             "encoder.layer.1.output.dense.bias", "encoder.layer.2.output.dense.weight",
             "pooler.dense.weight"]
    scales = layer_scales(names, LinesConfig(alpha=0.2, beta=0.6))
    assert scales == pytest.approx({
        "embeddings.word_embeddings.weight": 0.2,          # below the first block
        "encoder.layer.0.attention.self.query.weight": 0.2,
        "encoder.layer.1.output.dense.bias": 0.5,          # 0.2 + 0.6 * 1/2
        "encoder.layer.2.output.dense.weight": 0.8,
        "pooler.dense.weight": 0.8,                        # above the last block
    })


def test_layer_scales_llama_names_and_single_block():
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight", "lm_head.weight"]
    s = layer_scales(names, LinesConfig(alpha=1.0, beta=0.3))
    assert s["model.layers.3.mlp.up_proj.weight"] == pytest.approx(1.3)
    assert s["model.layers.0.mlp.up_proj.weight"] == pytest.approx(1.0)
    assert layer_scales(["h.0.w", "ln_f.weight"], LinesConfig(alpha=0.7, beta=5.0)) == {"h.0.w": 0.7, "ln_f.weight": 0.7}


def test_lines_in_a_merge_scales_each_update(bert_zoo):
    common = dict(task_specific=r"^classifier\.")
    plain = primerge.merge(bert_zoo["base"], bert_zoo["models"], "tsv", **common).state_dict
    scaled = primerge.merge(bert_zoo["base"], bert_zoo["models"], "tsv",
                            lines={"alpha": 0.5, "beta": 0.5}, **common).state_dict
    base = load_file(str(bert_zoo["base"] / "model.safetensors"))
    for name, lam in (("encoder.layer.0.output.dense.weight", 0.5), ("encoder.layer.1.output.dense.weight", 1.0),
                      ("embeddings.word_embeddings.weight", 0.5), ("pooler.dense.bias", 1.0)):
        assert torch.allclose(scaled[name] - base[name], lam * (plain[name] - base[name]), atol=1e-6), name


def test_lines_config_errors():
    with pytest.raises(RecipeError, match="lines"):
        primerge.core.recipe.build_recipe({"base": "b", "models": ["m"], "lines": {"alpha": 1.0}})
    with pytest.raises(RecipeError, match="capture group"):
        primerge.core.recipe.build_recipe({"base": "b", "models": ["m"],
                                      "lines": {"alpha": 1, "beta": 1, "block_pattern": "layers"}})
