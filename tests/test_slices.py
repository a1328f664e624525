"""Layer stacks (primerge.core.slices): outputs whose blocks are ranges of the inputs' blocks,
copied (passthrough) or merged, written as real transformers checkpoints."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from primerge.api import dry_run, merge_recipe
from primerge.cli.main import main as cli
from primerge.core.recipe import build_recipe
from primerge.core.slices import SliceRecipe, from_mergekit
from primerge.util.errors import InputError, RecipeError

TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
#: family -> (config class, model class, config overrides): per-block attention types where the family has them
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(use_sliding_window=True, sliding_window=3, max_window_layers=2,
                                                      head_dim=4)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(sliding_window=3, sliding_window_pattern=2, head_dim=4)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(no_rope_layers=[1, 0, 1, 1])),
}
PROMPT = torch.tensor([[3, 9, 14, 2, 27, 5, 11, 40, 8, 1]])  # longer than the sliding windows (3)


def save_model(folder: Path, family: str, seed: int, **overrides) -> Path:
    """A random tiny causal LM of ``family``, weights drawn large enough for outputs to differ between inputs."""
    import transformers

    config_class, model_class, defaults = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**{**TINY, **defaults, **overrides})
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.ndim == 2 else 0.05).add_(1.0 if p.ndim == 1 else 0.0)
    model.save_pretrained(folder)
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def assemble(base: Path, out: Path, **fields) -> Path:
    merge_recipe(build_recipe({"base": str(base), **fields}), out=out)
    return out


def block(name: str, old: int, new: int) -> str:
    return name.replace(f"layers.{old}.", f"layers.{new}.")


def stacked(folder: Path, order: list[int]):
    """The reference: ``folder``'s model with its block modules rearranged in ``order`` (copies),
    in float64, as transformers runs it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    layers = [copy.deepcopy(model.model.layers[i]) for i in order]
    model.model.layers = torch.nn.ModuleList(layers)
    model.config.num_hidden_layers = len(order)
    if getattr(model.config, "layer_types", None) is not None:  # read per block by some forwards (Gemma 3)
        model.config.layer_types = [model.config.layer_types[i] for i in order]
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT, use_cache=False).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_identity_slice_reproduces_the_model_bit_for_bit(tmp_path, family):
    base = save_model(tmp_path / "base", family, 0)
    out = assemble(base, tmp_path / "out", slices=[{"model": "base", "layers": [0, 4]}])
    source, written = tensors(base), tensors(out)
    assert written.keys() == source.keys()
    assert all(written[n].dtype == source[n].dtype and torch.equal(written[n], source[n]) for n in source)
    assert config_of(out) == config_of(base)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_copy_stack_runs_as_the_rearranged_blocks(tmp_path, family):
    """Blocks [0, 3) + [1, 4) of a 4-block model: 6 blocks, each tensor the source block's, the
    config rewritten so that transformers runs it exactly as the source model with its block
    modules rearranged (float64 logits agree to 1e-9: the same operations on the same values;
    a block given another attention type changes logits by far more, the prompt being longer than
    the sliding window). The output generates."""
    from transformers import AutoModelForCausalLM

    base = save_model(tmp_path / "base", family, 0)
    out = assemble(base, tmp_path / "out", slices=[{"model": "base", "layers": [0, 3]},
                                                   {"model": "base", "layers": [1, 4]}])
    order = [0, 1, 2, 1, 2, 3]
    source, written = tensors(base), tensors(out)
    layered = [n for n in source if ".layers.0." in n]
    outside = [n for n in source if ".layers." not in n]
    assert len(written) == len(outside) + 6 * len(layered)
    for j, i in enumerate(order):
        assert all(torch.equal(written[block(n, 0, j)], source[block(n, 0, i)]) for n in layered)
    assert all(torch.equal(written[n], source[n]) for n in outside)
    config, before = config_of(out), config_of(base)
    assert config["num_hidden_layers"] == 6
    for key in ("layer_types", "no_rope_layers"):
        if key in before:
            assert config[key] == [before[key][i] for i in order]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    torch.testing.assert_close(logits(model), logits(stacked(base, order)), rtol=1e-9, atol=1e-9)
    generated = model.generate(PROMPT, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, PROMPT.shape[1] + 4)


def test_the_layer_types_a_pattern_implies_are_kept_per_block(tmp_path):
    """Qwen3 derives its layer types from max_window_layers (blocks 0-1 full, 2-3 sliding): stacking
    [2, 4) + [0, 2) puts the sliding blocks first, which the pattern alone would call full."""
    base = save_model(tmp_path / "base", "qwen3", 0)
    out = assemble(base, tmp_path / "out", slices=[{"model": "base", "layers": [2, 4]},
                                                   {"model": "base", "layers": [0, 2]}])
    assert config_of(out)["layer_types"] == ["sliding_attention"] * 2 + ["full_attention"] * 2


def finetune(base: Path, folder: Path, seed: int) -> Path:
    """``base``'s model with every floating tensor perturbed (a fine-tune of it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slices_zoo")
    base = save_model(root / "base", "llama", 0)
    return {"base": base, "code": finetune(base, root / "code", 1), "math": finetune(base, root / "math", 2),
            "other": save_model(root / "other", "llama", 3),
            "untied": save_model(root / "untied", "llama", 4, tie_word_embeddings=False)}


def test_a_merged_slice_is_the_method_over_matching_blocks(tmp_path, llama_zoo):
    """Output blocks 2-3 are θ₀ + λ Σ_t τ_t with θ₀ the base's blocks 2-3 and τ_t = θ_t − θ₀ from
    code's blocks 1-2 and math's blocks 2-3 (task arithmetic, λ = 0.5). Against a float64
    reference, float32 arithmetic (3 roundings of relative 2⁻²⁴ on values of magnitude at most
    |θ₀| + |θ_code| + |θ_math|) errs by under 4·2⁻²⁴ of that sum; blocks 0-1 are copied exactly."""
    zoo = llama_zoo
    out = assemble(zoo["base"], tmp_path / "out", models=[{"path": str(zoo["code"]), "name": "code"},
                                                          {"path": str(zoo["math"]), "name": "math"}],
                   method="task_arithmetic", parameters={"scale": 0.5},
                   slices=[{"model": "base", "layers": [0, 2]},
                           {"sources": [{"model": "base", "layers": [2, 4]}, {"model": "code", "layers": [1, 3]},
                                        {"model": "math", "layers": [2, 4]}]}])
    written = tensors(out)
    base, code, math = (tensors(zoo[k]) for k in ("base", "code", "math"))
    assert len(written) == len(base)
    for name in (n for n in base if ".layers.0." in n):
        for k in range(2):
            assert torch.equal(written[block(name, 0, k)], base[block(name, 0, k)])
            theta0 = base[block(name, 0, 2 + k)].double()
            ta, tb = code[block(name, 0, 1 + k)].double(), math[block(name, 0, 2 + k)].double()
            want = theta0 + 0.5 * ((ta - theta0) + (tb - theta0))
            bound = 4 * 2.0**-24 * (theta0.abs() + ta.abs() + tb.abs())
            assert bool(((written[block(name, 0, 2 + k)].double() - want).abs() <= bound).all()), name
    assert all(torch.equal(written[n], base[n]) for n in base if ".layers." not in n)


def test_head_from_a_model_that_stores_one_unties_it(tmp_path, llama_zoo):
    """A tied base, blocks from two models, the embeddings from the base and the final norm and
    head from 'untied' (which stores its own head): the output stores lm_head.weight = untied's and
    unties it in its config; transformers loads the two apart."""
    from transformers import AutoModelForCausalLM

    zoo = llama_zoo
    out = assemble(zoo["base"], tmp_path / "out", models=[{"path": str(zoo["untied"]), "name": "untied"}],
                   slices=[{"model": "base", "layers": [0, 2]}, {"model": "untied", "layers": [2, 4]}],
                   head="untied")
    base, other, written = tensors(zoo["base"]), tensors(zoo["untied"]), tensors(out)
    assert "lm_head.weight" not in base
    assert torch.equal(written["lm_head.weight"], other["lm_head.weight"])
    assert torch.equal(written["model.norm.weight"], other["model.norm.weight"])
    assert torch.equal(written["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert config_of(out)["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.get_output_embeddings().weight.detach(), other["lm_head.weight"])
    assert torch.equal(model.get_input_embeddings().weight.detach(), base["model.embed_tokens.weight"])


def test_head_from_a_tied_model_stays_tied(tmp_path, llama_zoo):
    """The head of a tied model is its embedding: the output keeps the base's tying (as mergekit
    writes it), taking only the final norm from the head's model."""
    zoo = llama_zoo
    out = assemble(zoo["base"], tmp_path / "out", models=[{"path": str(zoo["other"]), "name": "other"}],
                   slices=[{"model": "base", "layers": [0, 2]}, {"model": "other", "layers": [2, 4]}],
                   head="other")
    written = tensors(out)
    assert "lm_head.weight" not in written and config_of(out).get("tie_word_embeddings", True) is True
    assert torch.equal(written["model.norm.weight"], tensors(zoo["other"])["model.norm.weight"])


def test_passthrough_scale_zeroes_filtered_tensors(tmp_path, llama_zoo):
    """Depth up-scaling with the duplicated blocks' o_proj and down_proj scaled by 0: those are
    exact zeros, every other tensor copied bit for bit."""
    zoo = llama_zoo
    zero = [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}, {"value": 1.0}]
    out = assemble(zoo["base"], tmp_path / "out", slices=[{"model": "base", "layers": [0, 4]},
                                                          {"model": "base", "layers": [2, 4], "scale": zero}])
    base, written = tensors(zoo["base"]), tensors(out)
    for name in (n for n in base if ".layers.0." in n):
        for j, i in ((4, 2), (5, 3)):
            value = written[block(name, 0, j)]
            if "o_proj" in name or "down_proj" in name:
                assert not value.any()
            else:
                assert torch.equal(value, base[block(name, 0, i)])


def test_mergekit_slices_give_the_native_stack(tmp_path, llama_zoo):
    """mergekit's passthrough slices, translated, write what the native recipe writes; the
    tensors before the blocks come from the first slice's model, those after from the last's."""
    zoo = llama_zoo
    config = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": str(zoo["base"]), "layer_range": [0, 3]}]},
                         {"sources": [{"model": str(zoo["other"]), "layer_range": [1, 4]}]}]}
    native = from_mergekit(config)
    assert native == {"base": str(zoo["base"]), "models": [{"path": str(zoo["other"]), "name": "other"}],
                      "slices": [{"sources": [{"model": "base", "layers": [0, 3]}]},
                                 {"sources": [{"model": "other", "layers": [1, 4]}]}],
                      "embeddings": "base", "head": "other", "method": "passthrough"}
    translated = tensors(assemble(native.pop("base"), tmp_path / "a", **native))
    by_hand = tensors(assemble(zoo["base"], tmp_path / "b", models=[{"path": str(zoo["other"]), "name": "other"}],
                               slices=[{"model": "base", "layers": [0, 3]}, {"model": "other", "layers": [1, 4]}],
                               head="other"))
    assert translated.keys() == by_hand.keys() and all(torch.equal(translated[n], by_hand[n]) for n in by_hand)


def test_primerge_merge_runs_a_mergekit_slices_file_as_it_is(tmp_path, llama_zoo, capsys):
    """``primerge merge`` on mergekit's own YAML (passthrough slices): the same tensors as the native
    stack, the translation shown by ``plan``; another method is translated too (a one-source slice is
    copied whatever the method)."""
    import yaml

    zoo = llama_zoo
    config = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": str(zoo["base"]), "layer_range": [0, 3]}]},
                         {"sources": [{"model": str(zoo["other"]), "layer_range": [1, 4]}]}]}
    file = tmp_path / "mergekit.yaml"
    file.write_text(yaml.safe_dump(config))
    assert cli(["plan", str(file)]) == 0
    assert cli(["merge", str(file), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    native = from_mergekit(config)
    expected = tensors(assemble(native.pop("base"), tmp_path / "native", **native))
    got = tensors(tmp_path / "out")
    assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in expected)
    assert config_of(tmp_path / "out")["num_hidden_layers"] == 6
    capsys.readouterr()
    file.write_text(yaml.safe_dump({**config, "merge_method": "slerp"}))  # one source a slice: copied
    assert cli(["plan", str(file)]) == 0
    assert "primerge plan: slerp" in (out := capsys.readouterr().out) and "blocks 3-5: other 1-3 (copied)" in out


def test_mergekit_slices_refusals():
    with pytest.raises(RecipeError, match="base_model"):
        from_mergekit({"merge_method": "ties", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                                                                       {"model": "b", "layer_range": [0, 2]}]}]})
    with pytest.raises(RecipeError, match="LoRA"):
        from_mergekit({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a+l", "layer_range": [0, 2]}]}]})
    with pytest.raises(RecipeError, match="residual_weight"):
        from_mergekit({"merge_method": "passthrough",
                       "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}], "residual_weight": 0.5}]})


def test_plan_shows_the_output_architecture_and_size(tmp_path, llama_zoo):
    zoo = llama_zoo
    recipe = build_recipe({"base": str(zoo["base"]), "slices": [{"model": "base", "layers": [0, 3]},
                                                                 {"model": "base", "layers": [1, 4]}]})
    assert isinstance(recipe, SliceRecipe)
    text = dry_run(recipe, out=tmp_path / "out").to_text()
    base = tensors(zoo["base"])
    count = sum(t.numel() for n, t in base.items() if ".layers." not in n) + \
        6 * sum(t.numel() for n, t in base.items() if ".layers.0." in n)
    assert "LlamaForCausalLM, 6 blocks (the base has 4)" in text
    assert "blocks 0-2: base 0-2 (copied)" in text and "blocks 3-5: base 1-3 (copied)" in text
    assert f"{count / 1e3:.2f} k parameters" in text
    assert "peak memory" in text and "output size" in text


def test_cli_merges_a_slices_recipe_and_the_card_has_the_layer_map(tmp_path, llama_zoo, capsys):
    recipe = tmp_path / "stack.yaml"
    recipe.write_text(f"base: {llama_zoo['base']}\nslices:\n  - {{model: base, layers: [0, 4]}}\n"
                      f"  - {{model: base, layers: [3, 4]}}\n")
    assert cli(["plan", str(recipe), "--no-calibration"]) == 0
    assert "5 blocks (the base has 4)" in capsys.readouterr().out
    assert cli(["merge", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Layer map" in card and "| 4 | base 3 (copied) |" in card
    assert cli(["verify", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize(("fields", "error", "match"), [
    ({"slices": [{"model": "base", "layers": [2, 6]}]}, InputError, "has 4 blocks; a slice takes its block 4"),
    ({"slices": [{"model": "bsae", "layers": [0, 2]}]}, RecipeError, "Did you mean 'base'"),
    ({"slices": [{"model": "base", "layers": [3, 3]}]}, RecipeError, "0 <= first < end"),
    ({"models": ["CODE"], "method": "task_arithmetic",
      "slices": [{"sources": [{"model": "base", "layers": [0, 2]}, {"model": "code", "layers": [0, 3]}]}]},
     RecipeError, "ranges differ in length"),
    ({"models": ["CODE", "MATH"], "method": "task_arithmetic",
      "slices": [{"sources": [{"model": "base", "layers": [0, 2]}, {"model": "code", "layers": [0, 2]}]},
                 {"model": "math", "layers": [2, 4]}]},
     RecipeError, "lists the base .θ₀. and every model once"),
    ({"models": ["CODE"], "slices": [{"sources": [{"model": "base", "layers": [0, 2]},
                                                  {"model": "code", "layers": [0, 2]}]}]},
     RecipeError, "method passthrough cannot merge"),
    ({"models": ["CODE"], "slices": [{"model": "base", "layers": [0, 4]}]}, RecipeError, "code are in no slice"),
    ({"slices": [{"model": "base", "layers": [0, 4]}], "parameters": {"scale": 2}}, RecipeError, "no parameters"),
    ({"slices": [{"model": "base", "layers": [0, 4]}], "tokenizer": "union"}, RecipeError, "tokenizer cannot apply"),
    ({"models": ["OTHER16"], "slices": [{"model": "other16", "layers": [0, 4]}]}, InputError, "one architecture"),
])
def test_refusals_name_the_slice_and_the_fix(tmp_path, llama_zoo, fields, error, match):
    paths = {"CODE": {"path": str(llama_zoo["code"]), "name": "code"},
             "MATH": {"path": str(llama_zoo["math"]), "name": "math"}}
    if "OTHER16" in fields.get("models", []):
        paths["OTHER16"] = {"path": str(save_model(tmp_path / "wide", "llama", 5, hidden_size=32)), "name": "other16"}
    fields = {**fields, "models": [paths[m] for m in fields.get("models", [])]}
    with pytest.raises(error, match=match):
        assemble(llama_zoo["base"], tmp_path / "out", **fields)
    assert not (tmp_path / "out").exists()
