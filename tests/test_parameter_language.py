"""The parameter language (primerge.core.parameters): gradients over depth, filters by tensor class or
name, per-model values, their precedence, and what reaches the methods; tokenizer padding and chat
templates; hub ids read from a Hugging Face cache laid out in tmp_path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from llama_zoo import BLOCKS, build_llama_zoo, tensors
from primerge.cli.main import main
from primerge.core.chat_templates import NAMED
from primerge.core.parameters import Gradient, parse_setting, place_of
from primerge.core.plan import build_plan
from primerge.core.recipe import build_recipe
from primerge.util.errors import InputError, RecipeError

EPS64 = np.finfo(np.float64).eps


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_llama_zoo(tmp_path_factory.mktemp("llama"))


def recipe(llama, **fields):
    models = fields.pop("models", [{"path": str(llama["ft0"])}, {"path": str(llama["ft1"])}])
    return build_recipe({"base": str(llama["base"]), "models": models, **fields})


# ----------------------------------------------------------------------------------- gradients


def interpolation_reference(anchors: list[float], depth: float) -> float:
    """Piecewise-linear interpolation through (i/(n−1), a_i), in float64 (numpy's interp)."""
    if len(anchors) == 1:
        return float(anchors[0])
    return float(np.interp(depth, np.linspace(0.0, 1.0, len(anchors)), np.asarray(anchors, dtype=np.float64)))


@pytest.mark.parametrize("anchors", [[0.3], [0.2, 0.8], [1.0, 0.0, 1.0], [0.1, 0.5, 0.2, 0.9, 0.4], [-2.0, 3.0, 7.5]])
def test_a_gradient_interpolates_linearly_between_anchors_spread_over_depth(anchors):
    """The same line as the float64 reference at every depth: both are (1 − f) a_i + f a_{i+1} on
    the segment holding t, computed in float64 in two orders of operations, so they differ by a few
    roundings of values of size max|a|: at most 8 ε max|a|."""
    bound = 8 * EPS64 * max(abs(a) for a in anchors)
    for depth in np.linspace(0.0, 1.0, 37):
        assert abs(Gradient(tuple(anchors)).at(float(depth)) - interpolation_reference(anchors, depth)) <= bound


def test_a_gradient_of_text_or_booleans_steps_to_the_anchor_below():
    steps = Gradient(("a", "b", "c"))
    assert [steps.at(t) for t in (0.0, 0.49, 0.5, 0.99, 1.0)] == ["a", "a", "b", "b", "c"]
    assert Gradient((True, False)).at(0.7) is True


def test_depth_is_block_over_blocks_minus_one_and_zero_outside_blocks():
    assert [place_of(f"model.layers.{i}.mlp.up_proj.weight", 5).depth for i in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    assert place_of("model.embed_tokens.weight", 5).depth == 0.0
    assert place_of("lm_head.weight", 5).depth == 0.0  # mergekit 0.1.5 plans the head at t = 0 too
    assert place_of("model.layers.0.self_attn.q_proj.weight", 1).depth == 1.0  # one block: t = 1


# ----------------------------------------------------------------------------------- filters


def test_the_first_matching_rule_gives_the_value_and_filters_match_names_or_classes():
    setting = parse_setting([{"filter": "self_attn", "value": 0.1}, {"filter": "up_proj", "value": [0.2, 0.4]},
                             {"filter": "mlp", "value": 0.3}, {"value": 0.9}], "density")
    at = {name: setting.at(place_of(name, 3)) for name in (
        "model.layers.1.self_attn.k_proj.weight", "model.layers.2.mlp.up_proj.weight",
        "model.layers.2.mlp.down_proj.weight", "model.norm.weight", "transformer.h.1.attn.c_attn.weight")}
    assert at == {"model.layers.1.self_attn.k_proj.weight": 0.1, "model.layers.2.mlp.up_proj.weight": 0.4,
                  "model.layers.2.mlp.down_proj.weight": 0.3, "model.norm.weight": 0.9,
                  "transformer.h.1.attn.c_attn.weight": 0.1}  # GPT-2's attention: the self_attn class
    assert parse_setting([{"filter": "mlp", "value": 1.0}], "x").at(place_of("model.norm.weight", 3)) is None


def test_bad_settings_are_one_line_errors_naming_the_parameter():
    for raw in ([], [{"filter": "mlp"}], [{"value": 1, "where": "x"}], {"value": {"a": 1}}):
        with pytest.raises(RecipeError, match="density"):
            parse_setting(raw, "density")


# ----------------------------------------------------------------------------------- resolution


def test_precedence_model_then_recipe_then_default_and_per_model_values_become_per_task_lists(llama):
    r = recipe(llama, method="ties", models=[
        {"path": str(llama["ft0"]), "parameters": {"density": [{"filter": "mlp", "value": 0.5}]}},
        {"path": str(llama["ft1"]), "weight": 0.25},
        {"path": str(llama["ft2"]), "parameters": {"weight": [0.0, 1.0]}}],
        parameters={"density": [{"filter": "self_attn", "value": 0.7}], "scale": 0.9})
    plan = build_plan(r)
    by_name = {e.name: plan.tensor_parameters(e) for e in plan.mergeable()}
    mlp = by_name["model.layers.1.mlp.up_proj.weight"]
    attn = by_name["model.layers.3.self_attn.q_proj.weight"]
    norm = by_name["model.norm.weight"]
    assert mlp.params.density == [0.5, 0.2, 0.2]  # the model's own, else the method's default (no recipe rule)
    assert attn.params.density == 0.7  # every model falls back to the recipe's rule
    assert norm.params.density == 0.2
    assert mlp.params.scale == attn.params.scale == 0.9
    assert mlp.weights == pytest.approx((1.0, 0.25, 1 / 3), rel=0, abs=1e-15)  # weight gradient at t = 1/3
    assert norm.weights == (1.0, 0.25, 0.0)
    assert plan.recipe.params.density == 0.2  # what every tensor shares: the default where settings vary


def test_per_model_density_reaches_ties_as_per_task_values_and_the_merge_equals_a_float64_reference(llama, tmp_path):
    """Each tensor's output equals a float64 TIES (trim each w_t τ_t to its own density, elect signs,
    disjoint mean) given the resolved per-task densities and weights. The reference trims the same
    float32 products w_t·τ_t primerge reads, so both keep the same entries; what remains is float32
    rounding of sums of at most 3 terms and one division: below 1e-5 · max|w τ| per entry."""
    r = recipe(llama, method="ties", models=[
        {"path": str(llama["ft0"]), "parameters": {"density": [0.2, 0.9], "weight": 1.0}},
        {"path": str(llama["ft1"]), "parameters": {"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}],
                                                   "weight": 0.5}}],
        parameters={"normalize": "weights"})
    result = primerge_merge(r, tmp_path / "out")
    plan = build_plan(r)
    base, fts = tensors(llama["base"]), [tensors(llama["ft0"]), tensors(llama["ft1"])]
    blocks = BLOCKS
    for entry in plan.mergeable():
        chosen = plan.tensor_parameters(entry)
        place = place_of(entry.name, blocks)
        expected_first = interpolation_reference([0.2, 0.9], place.depth)
        assert chosen.params.density[0] == pytest.approx(expected_first, rel=0, abs=8 * EPS64)
        assert chosen.params.density[1] == (0.3 if "mlp" in entry.name else 0.6)
        weighted = [(ft[entry.name] - base[entry.name]) * w for ft, w in zip(fts, chosen.weights)]  # float32, as read
        want = base[entry.name].double() + ties_reference(weighted, chosen.params.density, chosen.weights)
        got = result[entry.name].double()
        bound = 1e-5 * max(float(t.abs().max()) for t in weighted)
        assert float((got - want).abs().max()) <= bound, entry.name


def ties_reference(weighted: list[torch.Tensor], densities: list[float], weights: tuple[float, ...]) -> torch.Tensor:
    """TIES in float64 with per-task densities (nearest-integer count) and division by the agreeing
    models' weights."""
    trimmed = []
    for tau, density in zip(weighted, densities):
        flat = tau.reshape(-1)
        k = round(density * flat.numel())
        threshold = flat.abs().sort(descending=True).values[k - 1] if k > 0 else math.inf
        trimmed.append(torch.where(tau.abs() >= threshold, tau, 0.0).double())
    stacked = torch.stack(trimmed)
    elected = stacked.sum(0).sign()
    agree = stacked.sign() == elected
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * (stacked.dim() - 1))
    divisor = (agree * w).sum(0)
    return (stacked * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)


def primerge_merge(r, out):
    import primerge

    primerge.merge_recipe(r, out=out)
    return tensors(out)


def test_per_model_drop_rate_reaches_dare_as_one_value_per_model(llama):
    r = recipe(llama, method="dare", models=[{"path": str(llama["ft0"]), "parameters": {"drop_rate": 0.1}},
                                             {"path": str(llama["ft1"]), "parameters": {"drop_rate": [0.3, 0.5]}}])
    plan = build_plan(r)
    resolved = sorted({tuple(plan.tensor_parameters(e).params.drop_rate) for e in plan.mergeable()})
    expected = [(0.1, interpolation_reference([0.3, 0.5], i / (BLOCKS - 1))) for i in range(BLOCKS)]
    assert len(resolved) == BLOCKS  # tensors outside blocks sit at depth 0, with block 0
    for got, want in zip(resolved, expected):
        assert got[0] == want[0] and abs(got[1] - want[1]) <= 8 * EPS64


def test_the_plan_and_the_card_show_the_resolved_values_per_class_and_blocks(llama, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({"base": str(llama["base"]), "models": [str(llama["ft0"]), str(llama["ft1"])],
                                "method": "ties", "parameters": {
                                    "density": [{"filter": "self_attn", "value": [0.1, 0.4]}, {"value": 0.5}]}}))
    assert main(["plan", str(path), "--no-calibration"]) == 0
    text = capsys.readouterr().out
    section = text[text.index("Parameters per tensor"):text.index("Resources")]
    assert "self_attn" in section and "block 3" in section and "density=0.4" in section and "density=0.1" in section
    assert main(["merge", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Parameters per tensor" in card and "density=0.2" in card  # block 1 of 4: 0.1 + 0.3/3


def test_a_filter_that_matches_no_tensor_is_noted_in_the_plan(llama):
    plan = build_plan(recipe(llama, method="ties", parameters={"density": [{"filter": "q_prj", "value": 0.5}]}))
    assert any("filter 'q_prj' matches no merged tensor" in note for note in plan.notes)


def test_refusals_name_the_parameter_before_anything_is_read(llama, tmp_path):
    cases = [
        ({"parameters": {"densty": 0.3}}, "Did you mean 'density'"),
        ({"models": [{"path": str(llama["ft0"]), "parameters": {"normalize": "weights"}}]}, "whole merge"),
        ({"parameters": {"density": [0.2, 1.5]}}, "density"),
        ({"models": [{"path": str(llama["ft0"]), "weight": 0.5, "parameters": {"weight": 0.5}}]}, "weight is given twice"),
        ({"models": [{"path": str(llama["ft0"]), "parameters": {"weight": "heavy"}}]}, "weight is a number"),
    ]
    for fields, message in cases:
        with pytest.raises(RecipeError, match=message):
            recipe(llama, method="ties", **fields)


def test_a_whole_model_pre_pass_refuses_parameters_that_vary_over_tensors(llama):
    r = recipe(llama, method="ties", parameters={"trim_scope": "model", "density": [0.2, 0.4]})
    with pytest.raises(RecipeError, match="one whole-model pre-pass.*density"):
        build_plan(r)
    same = recipe(llama, method="ties", parameters={"trim_scope": "model"},
                  models=[{"path": str(llama["ft0"]), "parameters": {"density": 0.3}}, str(llama["ft1"])])
    assert build_plan(same).method_params.density == [0.3, 0.2]  # per model, the same for every tensor: allowed


# ----------------------------------------------------------------------------------- tokenizer and chat template


def test_pad_to_multiple_of_rounds_the_rows_up_with_zero_padding(llama, tmp_path):
    r = recipe(llama, method="task_arithmetic", tokenizer={"source": "base", "pad_to_multiple_of": 64})
    out = primerge_merge(r, tmp_path / "out")
    rows = tensors(llama["base"])["model.embed_tokens.weight"].shape[0]
    padded = -(-rows // 64) * 64
    assert out["model.embed_tokens.weight"].shape[0] == out["lm_head.weight"].shape[0] == padded != rows
    assert torch.count_nonzero(out["model.embed_tokens.weight"][rows:]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == padded
    assert "pad_to_multiple_of: 64" in r.to_yaml()


def test_a_named_chat_template_is_written_with_agreeing_eos_tokens(llama, tmp_path):
    from transformers import AutoTokenizer

    primerge_merge(recipe(llama, method="task_arithmetic", chat_template="chatml"), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == NAMED["chatml"].text and config["eos_token"] == "<|im_end|>"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert stop in (generation["eos_token_id"] if isinstance(generation["eos_token_id"], list) else [generation["eos_token_id"]])
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert (ids if isinstance(ids, list) else ids["input_ids"])[-2] == stop  # the assistant turn ends with the stop token


def test_a_template_whose_stop_token_the_vocabulary_lacks_is_refused(llama):
    with pytest.raises(RecipeError, match="<\\|eot_id\\|>"):
        build_plan(recipe(llama, method="task_arithmetic", chat_template="llama3"))
    with pytest.raises(RecipeError, match="chat_template"):
        recipe(llama, method="task_arithmetic", chat_template="vicuna")


def test_auto_takes_the_template_most_inputs_have(llama, tmp_path):
    import shutil

    folders = {}
    for name, template in (("a", "{{ 'A' }}<|im_end|>"), ("b", "{{ 'B' }}"), ("c", "{{ 'B' }}")):
        folders[name] = tmp_path / name
        shutil.copytree(llama["ft0"], folders[name])
        config = json.loads((folders[name] / "tokenizer_config.json").read_text())
        (folders[name] / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    plan = build_plan(recipe(llama, method="task_arithmetic", chat_template="auto",
                             models=[str(folders["a"]), str(folders["b"]), str(folders["c"])]))
    written = next(f for f in plan.files if f.name == "tokenizer_config.json")
    assert dict(written.changes)[("chat_template",)] == "{{ 'B' }}"
    assert any("auto: the template of b, c (2 of 4 inputs)" in n for n in plan.notes)


# ----------------------------------------------------------------------------------- hub ids


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root, repo: str, folder, refs=("main",)):
    """``repo``'s files laid out as huggingface_hub's cache (refs/<ref> -> a snapshot of ``folder``)."""
    import shutil

    entry = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / COMMIT)
    (entry / "refs").mkdir(parents=True)
    for ref in refs:
        (entry / "refs" / ref).write_text(COMMIT)
    return root


def test_hub_ids_resolve_offline_from_the_cache(llama, tmp_path, monkeypatch):
    cache = fake_hub_cache(tmp_path / "hub", "org/tiny", llama["base"], refs=("main", "v1"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = cache / "models--org--tiny" / "snapshots" / COMMIT
    r = build_recipe({"base": "org/tiny", "models": ["org/tiny@v1", f"org/tiny@{COMMIT}", str(llama["ft0"])],
                      "method": "task_arithmetic"})
    assert r.base == snapshot and [m.path for m in r.models[:2]] == [snapshot, snapshot]
    assert r.model_labels()[:2] == ["tiny@v1", f"tiny@{COMMIT}"]
    with pytest.raises(InputError, match="huggingface-cli download org/missing --revision dev"):
        build_recipe({"base": "org/tiny", "models": ["org/missing@dev"], "method": "task_arithmetic"})


def test_a_missing_hub_id_is_one_line_on_the_command_line(llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "r.yaml"
    path.write_text(f"base: {llama['base']}\nmodels: [org/absent]\nmethod: task_arithmetic\n")
    assert main(["plan", str(path), "--no-calibration"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "huggingface-cli download org/absent" in err and "Traceback" not in err
