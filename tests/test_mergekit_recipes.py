"""mergekit configurations run as they are (primerge.core.mergekit): the translation, the notes on
where semantics differ, one-line refusals, model cards as recipes, ``primerge convert``, and a
gradient + filter TIES recipe merged end to end on a tiny Llama zoo against a float64 reference
of mergekit's TIES."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from llama_zoo import BLOCKS, build_llama_zoo, tensors
from primerge.cli.main import main
from primerge.core.mergekit import translate_config
from primerge.core.parameters import place_of
from primerge.core.plan import build_plan
from primerge.core.recipe import load_recipe
from primerge.util.errors import RecipeError

EPS64 = np.finfo(np.float64).eps


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_llama_zoo(tmp_path_factory.mktemp("llama"))


def write(path, data) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return str(path)


# ----------------------------------------------------------------------------------- translation


def test_ties_is_translated_with_mergekit_defaults_made_explicit():
    native = translate_config({"merge_method": "ties", "base_model": "b",
                               "models": [{"model": "b"}, {"model": "x", "parameters": {"weight": 0.5}}]})
    assert native["method"] == "ties" and native["base"] == "b"
    assert native["models"] == [{"path": "x", "parameters": {"weight": 0.5}}]  # the base is the reference
    assert native["parameters"] == {"density": 1.0, "rounding": "floor", "normalize": "weights", "rescale": "none",
                                    "scale": 1.0}
    ta = translate_config({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "x"}]})
    assert ta["parameters"] == {"normalize": "none", "scale": 1.0}  # primerge's own default would be 1/T


def test_every_value_a_setting_writes_is_translated():
    native = translate_config({
        "merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "x"}],
        "parameters": {"normalize": [True, False], "lambda": [{"filter": "mlp", "value": 0.7}, {"value": 1.3}]}})
    assert native["parameters"]["normalize"] == ["weights", "none"]
    assert native["parameters"]["scale"] == [{"filter": "mlp", "value": 0.7}, {"value": 1.3}]


def test_base_policies_follow_mergekit():
    linear = translate_config({"merge_method": "linear", "models": [{"model": "x"}, {"model": "y"}]})
    assert linear["base"] == "x" and [m["path"] for m in linear["models"]] == ["x", "y"]
    karcher = translate_config({"merge_method": "karcher", "base_model": "b", "models": [{"model": "x"}]})
    assert [m["path"] for m in karcher["models"]] == ["x", "b"]  # mergekit merges the base as one more input
    nuslerp = translate_config({"merge_method": "nuslerp", "models": [{"model": "x"}, {"model": "y"}]})
    assert nuslerp["parameters"]["space"] == "weights"
    with_base = translate_config({"merge_method": "nuslerp", "base_model": "b",
                                  "models": [{"model": "x"}, {"model": "y"}]})
    assert with_base["parameters"]["space"] == "task_vectors" and with_base["base"] == "b"
    slerp = translate_config({"merge_method": "slerp", "base_model": "b", "parameters": {"t": 0.3},
                              "models": [{"model": "b"}, {"model": "x", "parameters": {"weight": 2.0}}]})
    assert slerp["models"] == [{"path": "x"}] and slerp["parameters"] == {"t": 0.3}
    assert any("slerp has no weights" in n for n in slerp["origin"]["notes"])


def test_what_mergekit_ignores_is_dropped_with_a_note():
    native = translate_config({
        "merge_method": "ties", "base_model": "b", "name": "my-merge",
        "models": [{"model": "x", "parameters": {"weight": 1.0, "normalize": False, "lambda": 2.0}}],
        "parameters": {"int8_mask": True, "t": 0.5}})
    notes = native["origin"]["notes"]
    assert native["models"][0]["parameters"] == {"weight": 1.0}
    for fragment in ("name: not read", "int8_mask", "parameters.t: mergekit's ties has no such parameter",
                     "parameters.normalize: one value for the whole merge", "sign election"):
        assert any(fragment in n for n in notes), fragment


def test_della_moves_a_models_epsilon_with_its_density():
    """mergekit keeps τ whole at density 1 whatever ε; primerge's DELLA needs ε = 0 there, so a model
    whose own density is below 1 gets mergekit's ε back."""
    native = translate_config({"merge_method": "della", "base_model": "b",
                               "models": [{"model": "x", "parameters": {"density": 0.6}}, {"model": "y"}]})
    assert native["parameters"]["epsilon"] == 0.0
    assert native["models"][0]["parameters"] == {"epsilon": 0.15, "density": 0.6}
    assert any("random masks" in n for n in native["origin"]["notes"])


@pytest.mark.parametrize("config, key", [
    ({"merge_method": "ties", "base_model": "b", "slices": [
        {"sources": [{"model": "x", "layer_range": [0, 2]}, {"model": "b", "layer_range": [2, 4]}], "residual_weight": 0.5}]},
     r"slices\[0\]: residual_weight"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "x+adapter", "layer_range": [0, 2]}]},
                                                {"sources": [{"model": "x", "layer_range": [2, 4]}]}]},
     "applies a LoRA"),
    ({"merge_method": "ties", "modules": {"text": {"models": [{"model": "x"}]}}}, "modules:"),
    ({"merge_method": "passthrough", "models": [{"model": "x"}]}, "merge_method passthrough"),
    ({"merge_method": "magic", "models": [{"model": "x"}]}, "merge_method 'magic'"),
    ({"merge_method": "ties", "models": [{"model": "x"}]}, "needs base_model"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x+lora"}]}, "models\\[0\\].model"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}],
      "tokenizer": {"source": "union", "tokens": {"<x>": {"source": "x"}}}}, "tokenizer.tokens"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}], "dtype": "int8"}, "dtype"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}], "tokenizer_source": "z"},
     "tokenizer_source"),
])
def test_what_cannot_be_honoured_is_refused_in_one_line_naming_the_key(config, key, tmp_path, capsys):
    with pytest.raises(RecipeError, match=key):
        translate_config(config)
    assert main(["plan", write(tmp_path / "mk.yml", config), "--no-calibration"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("primerge: error: ")


# ----------------------------------------------------------------------------------- end to end


def gradient_filter_ties(llama) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(llama["base"]),
        "models": [
            {"model": str(llama["base"])},
            {"model": str(llama["ft0"]), "parameters": {"weight": 1.0, "density": [0.3, 0.9]}},
            {"model": str(llama["ft1"]), "parameters": {
                "weight": [{"filter": "mlp", "value": [0.2, 1.0]}, {"value": 0.6}],
                "density": [{"filter": "self_attn", "value": 0.5}, {"value": 0.8}]}},
        ],
        "parameters": {"lambda": [{"filter": "norm", "value": 1.0}, {"value": 0.9}]},
        "dtype": "float32",
    }


def mergekit_setting(raw, name: str, depth: float):
    """mergekit's rule for one setting at one tensor, in float64: the first rule whose filter is in
    the name; a list of numbers interpolated linearly over depth."""
    for rule in raw if isinstance(raw, list) and isinstance(raw[0], dict) else [{"value": raw}]:
        if rule.get("filter") is None or rule["filter"] in name:
            value = rule["value"]
            if isinstance(value, list):
                return float(np.interp(depth, np.linspace(0, 1, len(value)), np.asarray(value, dtype=np.float64)))
            return value
    return None


def mergekit_ties(weighted: list[torch.Tensor], densities: list[float], weights: tuple[float, ...], scale: float
                  ) -> torch.Tensor:
    """mergekit's TIES in float64: keep max(1, ⌊density·N⌋) largest |w τ| per task, elect signs,
    sum the agreeing entries, divide by the agreeing models' weights, times λ."""
    trimmed = []
    for tau, density in zip(weighted, densities):
        flat = tau.reshape(-1)
        k = flat.numel() if density >= 1 else max(1, math.floor(density * flat.numel()))
        threshold = flat.abs().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(tau.abs() >= threshold, tau, 0.0).double())
    stacked = torch.stack(trimmed)
    agree = stacked.sign() == stacked.sum(0).sign()
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * (stacked.dim() - 1))
    divisor = (agree * w).sum(0)
    return scale * (stacked * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)


def test_a_mergekit_ties_recipe_with_gradients_and_filters_merges_as_mergekit_defines_it(llama, tmp_path):
    """Every resolved value equals mergekit's rule (float64, within 8 ε); every output tensor equals
    mergekit's TIES in float64 given those values, trimming the same float32 products w_t·τ_t primerge
    reads (so both keep the same entries): what remains is float32 rounding of a sum of two terms,
    one division and one product, below 1e-5 · max|w τ| per entry."""
    config = gradient_filter_ties(llama)
    path = write(tmp_path / "mk.yml", config)
    assert main(["merge", path, "--out", str(tmp_path / "out"), "--quiet"]) == 0
    merged = tensors(tmp_path / "out")
    plan = build_plan(load_recipe(path))
    base, fts = tensors(llama["base"]), [tensors(llama["ft0"]), tensors(llama["ft1"])]
    models = config["models"][1:]
    for entry in plan.mergeable():
        chosen = plan.tensor_parameters(entry)
        depth = place_of(entry.name, BLOCKS).depth
        density = chosen.params.density if isinstance(chosen.params.density, list) else [chosen.params.density] * 2
        for t, model in enumerate(models):
            assert abs(chosen.weights[t] - mergekit_setting(model["parameters"]["weight"], entry.name, depth)) <= 8 * EPS64
            assert abs(density[t] - mergekit_setting(model["parameters"]["density"], entry.name, depth)) <= 8 * EPS64
        assert chosen.params.scale == mergekit_setting(config["parameters"]["lambda"], entry.name, depth)
        weighted = [(ft[entry.name] - base[entry.name]) * w for ft, w in zip(fts, chosen.weights)]
        want = base[entry.name].double() + mergekit_ties(weighted, density, chosen.weights, chosen.params.scale)
        bound = 1e-5 * max(float(t.abs().max()) for t in weighted)
        assert float((merged[entry.name].double() - want).abs().max()) <= bound, entry.name


def test_a_model_card_is_a_recipe_and_convert_prints_the_same_merge(llama, tmp_path, capsys):
    config = gradient_filter_ties(llama)
    yaml_path = write(tmp_path / "mk.yml", config)
    card = tmp_path / "README.md"
    write(card, "---\ntags: [mergekit]\n---\n# merged\n\n```python\nprint('not this')\n```\n\n"
                f"### Configuration\n\n```yaml\n{yaml.safe_dump(config, sort_keys=False)}```\n")
    assert main(["merge", yaml_path, "--out", str(tmp_path / "from_yaml"), "--quiet"]) == 0
    assert main(["merge", str(card), "--out", str(tmp_path / "from_card"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["convert", yaml_path]) == 0
    native = capsys.readouterr().out
    assert native.startswith("# primerge recipe of") and "#   - sign election" in native
    assert main(["merge", write(tmp_path / "native.yml", native), "--out", str(tmp_path / "native"), "--quiet"]) == 0
    reference = (tmp_path / "from_yaml" / "model.safetensors").read_bytes()
    assert (tmp_path / "from_card" / "model.safetensors").read_bytes() == reference
    assert (tmp_path / "native" / "model.safetensors").read_bytes() == reference
    written = (tmp_path / "from_yaml" / "README.md").read_text()
    assert "## Translated from mergekit" in written and "## Original mergekit configuration" in written
    assert main(["merge", str(tmp_path / "from_yaml" / "README.md"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == reference  # primerge's own card reproduces it


def test_a_card_without_a_recipe_is_refused(tmp_path, capsys):
    assert main(["plan", write(tmp_path / "README.md", "# nothing\n\n```yaml\na: 1\n```\n"), "--no-calibration"]) == 2
    assert "no ```yaml block" in capsys.readouterr().err


def test_one_slice_over_every_layer_is_the_models_merge_and_a_partial_one_is_refused(llama, tmp_path):
    models = gradient_filter_ties(llama)["models"]
    as_models = {"merge_method": "ties", "base_model": str(llama["base"]), "models": models}
    as_slice = {"merge_method": "ties", "base_model": str(llama["base"]),
                "slices": [{"sources": [{**m, "layer_range": [0, BLOCKS]} for m in models]}]}
    for name, config in (("models", as_models), ("slice", as_slice)):
        assert main(["merge", write(tmp_path / f"{name}.yml", config), "--out", str(tmp_path / name), "--quiet"]) == 0
    assert (tmp_path / "slice" / "model.safetensors").read_bytes() == (tmp_path / "models" / "model.safetensors").read_bytes()
    partial = {**as_slice, "slices": [{"sources": [{**m, "layer_range": [0, BLOCKS - 1]} for m in models]}]}
    with pytest.raises(RecipeError, match="slices: layer_range"):
        build_plan(load_recipe(write(tmp_path / "partial.yml", partial)))


def test_slice_parameters_rank_between_the_models_and_the_recipe(llama, tmp_path):
    sources = [{"model": str(llama["ft0"]), "layer_range": [0, BLOCKS], "parameters": {"weight": 1.0}},
               {"model": str(llama["ft1"]), "layer_range": [0, BLOCKS], "parameters": {"weight": 1.0, "density": 0.9}}]
    config = {"merge_method": "ties", "base_model": str(llama["base"]), "parameters": {"density": 0.2},
              "slices": [{"sources": sources, "parameters": {"density": [{"filter": "mlp", "value": 0.5}]}}]}
    plan = build_plan(load_recipe(write(tmp_path / "mk.yml", config)))
    by_name = {e.name: plan.tensor_parameters(e).params.density for e in plan.mergeable()}
    assert by_name["model.layers.0.mlp.up_proj.weight"] == [0.5, 0.9]
    assert by_name["model.layers.0.self_attn.q_proj.weight"] == [0.2, 0.9]


def test_the_plan_shows_the_translation_and_says_random_masks_cannot_match(llama, tmp_path, capsys):
    config = {"merge_method": "dare_ties", "base_model": str(llama["base"]),
              "models": [{"model": str(llama["ft0"]), "parameters": {"weight": 1.0, "density": 0.5}},
                         {"model": str(llama["ft1"]), "parameters": {"weight": 0.5, "density": 0.5}}],
              "dtype": "bfloat16", "tokenizer_source": "base", "chat_template": "chatml"}
    assert main(["plan", write(tmp_path / "mk.yml", config), "--no-calibration"]) == 0
    text = capsys.readouterr().out
    section = text[text.index("Translated from mergekit"):]
    for fragment in ("random masks: dare_ties", "cannot match its draws bit for bit", "computes in bfloat16",
                     "chat_template: primerge also makes eos_token"):
        assert fragment in section, fragment
