"""``primerge tune --search``: per-model weights and the scale as a gradient over depth (the genome of
mergekit-evolve). The space's points become valid recipes; a gradient trial is derived from one
cached merge and equals a real merge; the per-layer scale is mergekit's linear interpolation; a tune
run on the tiny zoo finds that a harmful model's weight belongs near 0, on validation data only;
the LLM suite (lm-eval) searches the same genome from the command line."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_tuning import poisoned
from tuning_zoo import tuning_zoo  # noqa: F401  (fixture)

import primerge
from primerge.cli.main import main
from primerge.core.parameters import block_count, layer_index
from primerge.core.plan import build_plan
from primerge.core.recipe import build_recipe, load_recipe
from primerge.methods.base import get_method
from primerge.tuning import EncoderSuite, TuneSettings, tune
from primerge.tuning.cache import UpdateCache, recipe_with, scale_at, update_error
from primerge.tuning.genome import (Genome, ScaleGradient, WeightSpace, grouped, method_search, parse_search,
                                    search_parts)
from primerge.tuning.spaces import space_for
from primerge.util.errors import RecipeError

transformers = pytest.importorskip("transformers")

FULL = Genome(WeightSpace(), ScaleGradient(3))
LAYERS = 5


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A random 5-block BERT and two fine-tunes of it (the base plus seeded noise on every matrix):
    enough blocks for a 3-anchor gradient to interpolate (depths 0, 1/4, 1/2, 3/4, 1)."""
    root = tmp_path_factory.mktemp("deep")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(root / "base")
    state = load_file(str(root / "base" / "model.safetensors"))
    models = []
    for seed in (1, 2):
        folder = root / f"ft{seed}"
        shutil.copytree(root / "base", folder)
        g = torch.Generator().manual_seed(seed)
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()},
                  str(folder / "model.safetensors"))
        models.append(str(folder))
    return build_recipe({"base": str(root / "base"), "models": models, "method": "task_arithmetic"})


def test_search_parts_are_parsed_and_refused_in_one_line():
    assert parse_search(["params", "weights", "scale-gradient:3"]) == (True, FULL)
    assert parse_search(["weights:-1:1"]) == (False, Genome(WeightSpace(-1.0, 1.0), None))
    assert parse_search(["params"]) == (True, Genome())
    assert search_parts(True, FULL) == ["params", "weights:0:1", "scale-gradient:3"]
    assert parse_search(search_parts(False, Genome(WeightSpace(-1.0, 2.0)))) == (False, Genome(WeightSpace(-1.0, 2.0)))
    for bad, message in [(["scale-gradient:1"], "2 to 32"), (["scale-gradient:x"], "number of anchors"),
                         (["scale-gradient:33"], "2 to 32"), (["weights:1:0"], "finite LOW < HIGH"),
                         (["weights:a"], "weights:LOW:HIGH"), (["weights:0:inf"], "finite"),
                         (["genes"], "choose among params, weights"), (["params:2"], "choose among"),
                         ([], "at least one")]:
        with pytest.raises(RecipeError, match=message):
            parse_search(bad)


def test_idle_anchors_are_the_ones_between_blocks():
    """An anchor no block's depth takes any part of: K = 3 over 2 blocks leaves the middle one
    (depths 0 and 1 read anchors 0 and 2); K <= L, or K = 4 over 3 blocks (depths 0, 1/2, 1 read
    s = 0, 1.5, 3), leaves none."""
    def names(blocks: int) -> list[str]:
        return ["model.embed_tokens.weight", *(f"model.layers.{i}.mlp.up_proj.weight" for i in range(blocks))]

    assert ScaleGradient(3).idle(names(2)) == [1]
    assert ScaleGradient(5).idle(names(2)) == [1, 2, 3]
    assert ScaleGradient(4).idle(names(3)) == []
    assert ScaleGradient(3).idle(names(5)) == [] and ScaleGradient(2).idle(names(2)) == []


def _points(search, n: int, seed: int = 0) -> list[dict]:
    """The first trial and ``n`` points TPE proposes (random start-up) in the search's dimensions."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    points = [dict(search.first)]
    for _ in range(n):
        trial = study.ask()
        points.append({name: dim.suggest(trial, name) for name, dim in search.dims.items()})
        study.tell(trial, 0.0)
    return points


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "prime", "dare", "emr", "knots"])
def test_points_of_the_genome_become_valid_recipes(deep, method):
    """Every point (the first trial and TPE's proposals) is a recipe that validates: each model's
    weight is the point's, the scale a list of K anchors, which the plan resolves per tensor. A
    method without a scale of its own (EMR; KnOTS, whose scale is its inner merge's) searches no
    gradient and says so."""
    spec = get_method(method)
    recipe = deep.replace(method=method)
    labels = recipe.model_labels()
    search = method_search(spec, space_for(spec), recipe, {}, labels, True, FULL)
    gradient = method not in ("emr", "knots")
    assert [n for n in search.dims if n.startswith("weight[")] == ["weight[ft1]", "weight[ft2]"]
    assert (search.scale is not None) == gradient and (search.notes == ()) == gradient
    for point in _points(search, 4):
        params, weights = search.parameters(point), search.weights(point)
        tuned = recipe_with(recipe, params, None, weights)
        assert [m.weight for m in tuned.models] == [point[f"weight[{label}]"] for label in labels]
        if gradient:
            anchors = tuned.parameters[search.scale]
            assert anchors == [point[f"{search.scale}[{k}]"] for k in range(3)]
            assert tuned.settings.shared[search.scale].varies
            assert grouped(point)[search.scale] == anchors and grouped(point)["weights"] == weights
        again = build_recipe(yaml.safe_load(tuned.to_yaml()))  # what the report writes reads back the same
        assert {k: again.parameters[k] for k in tuned.parameters} == tuned.parameters
        assert [m.weight for m in again.models] == list(weights.values())
    first = search.first
    assert [first[f"weight[{label}]"] for label in labels] == [1.0, 1.0]  # the recipe's own weights
    if gradient:  # the method's default scale, flat over depth (1/T where unset)
        default = spec.parameters({}).model_dump().get(search.scale) or 1 / len(labels)
        assert [first[f"{search.scale}[{k}]"] for k in range(3)] == pytest.approx([default] * 3)


def test_the_first_trial_is_the_recipe_as_given(deep):
    """A recipe's own gradient is resampled at the K anchors' depths (t_k = k/(K-1)); a weight given
    as a number starts there (and widens the range to it); with params not searched only the genome is."""
    spec = get_method("task_arithmetic")
    models = [{"path": str(deep.models[0].path), "weight": 1.5}, str(deep.models[1].path)]
    recipe = deep.replace(models=models, parameters={"scale": [0.2, 0.8]})
    search = method_search(spec, space_for(spec, recipe.settings.uniform()), recipe, recipe.settings.uniform(),
                           recipe.model_labels(), False, FULL)
    assert search.first == {"scale[0]": 0.2, "scale[1]": pytest.approx(0.5), "scale[2]": 0.8,
                            "weight[ft1]": 1.5, "weight[ft2]": 1.0}
    assert search.dims["weight[ft1]"].high == 1.5 and search.dims["weight[ft2]"].high == 1.0
    assert set(search.dims) == set(search.first)  # the method's own parameters are not searched


def _reference_scale(anchors: list[float], layer: int | None) -> float:
    """mergekit's gradient in float64 with numpy: anchors evenly on [0, 1], linear between them,
    block ℓ of L at ℓ/(L-1), tensors outside the blocks at depth 0."""
    depth = 0.0 if layer is None else layer / (LAYERS - 1)
    return float(np.interp(depth, np.linspace(0.0, 1.0, len(anchors)), np.asarray(anchors, dtype=np.float64)))


def test_a_gradient_trial_derives_from_one_merge_and_equals_a_real_merge(deep):
    """The scale per tensor is the interpolation of a float64 numpy reference (to 1e-12: both are
    one linear interpolation of doubles), the same in the plan and in the cache; θ₀ + λ(t)·(M₁ − θ₀)
    equals a real merge with that gradient and those weights to float32 rounding (relative error of
    the update ≤ 1e-6: a few ulps of float32, 6e-8 each), and every gradient reuses one merge."""
    anchors = [0.2, 1.3, 0.6]
    weights = {"ft1": 0.7, "ft2": 0.25}
    tuned = recipe_with(deep, {"scale": anchors}, None, weights)
    plan = build_plan(tuned)
    try:
        names, table = list(plan.base.names), plan.parameters
    finally:
        plan.close()
    assert block_count(names) == LAYERS
    per_tensor = scale_at(anchors, names)
    for name in table.index:
        resolved = table.of(name)
        assert resolved.params.scale == pytest.approx(_reference_scale(anchors, layer_index(name)), abs=1e-12)
        assert resolved.params.scale == per_tensor[name] and resolved.weights == (0.7, 0.25)
    assert len({round(per_tensor[n], 9) for n in table.index}) == LAYERS  # one λ per block (t=0: block 0)
    cache = UpdateCache(recipe_with(deep, {}, None), "scale", log=lambda m: None)
    for lam in (anchors, [1.0, 0.1, 0.4], 0.5):
        built = cache.build({"scale": lam}, None, weights)
        real = primerge.merge_recipe(recipe_with(deep, {"scale": lam}, None, weights))
        assert update_error(cache.base_state(), built.model.state, real.state_dict) < 1e-6
    assert cache.merges == 2 and cache.linear  # λ = 1 once, plus the check at a gradient from 1/4 to 3/4
    cache.build({"scale": anchors}, None, {"ft1": 0.1, "ft2": 0.25})
    assert cache.merges == 3  # other weights: another merge


@pytest.fixture(scope="module")
def planted(tuning_zoo, tmp_path_factory):
    """The tiny zoo with its third model replaced by a harmful one: body θ₀ − (τ_colors + τ_animals)
    (a fine-tune that undoes the other two) and a head that ignores the body (zero weights, bias
    on class 0), scored on the sizes task."""
    root = tmp_path_factory.mktemp("planted")
    zoo = tuning_zoo["zoo"]
    base = load_file(str(zoo.base / "model.safetensors"))
    colors, animals = (load_file(str(p / "model.safetensors")) for p in zoo.paths[:2])
    junk = root / "junk"
    shutil.copytree(zoo.paths[2], junk)
    state = load_file(str(junk / "model.safetensors"))
    body = {k: base[k] - (colors[k] - base[k]) - (animals[k] - base[k]) for k in state if k in base}
    head = {k: torch.zeros_like(v) for k, v in state.items() if k not in base}
    head["classifier.bias"][0] = 1.0
    save_file({**body, **head}, str(junk / "model.safetensors"))
    data = {**tuning_zoo["recipe"], "models": [*tuning_zoo["recipe"]["models"][:2], str(junk)],
            "parameters": {"scale": 1.0}}
    return build_recipe(data)


def test_tuning_weights_finds_the_harmful_model_on_validation_only(tuning_zoo, planted, tmp_path):
    """Task Arithmetic at λ = 1 merges the body θ₀ + (w_c − w_j) τ_colors + (w_a − w_j) τ_animals
    (exactly, up to rounding), so the first trial (every weight 1) is the base itself, at chance on
    colors and animals, and the junk task's term is exactly 1 in every trial (its head ignores the
    body): the objective rises only as w_j falls below the other weights, and is best near w_j = 0
    with w_c, w_a large. The seeded TPE's first ten proposals do not depend on the scores; a dozen
    trials find the region. The test split raises the moment anything reads it, so every trial and
    the confirming merge ran on validation data only."""
    suite = EncoderSuite(planted, poisoned(tuning_zoo["splits"]), size=30, cache=tmp_path / "scores")
    settings = TuneSettings(trials=12, method_params=False, genome=Genome(WeightSpace()))
    result = tune(planted, suite, None, settings, out=tmp_path / "report", log=lambda m: None)
    found = result.results[0]
    weights = grouped(found.best_params)["weights"]
    assert set(found.best_params) == {"weight[colors]", "weight[animals]", "weight[junk]"}
    assert found.trials[0].params == {"weight[colors]": 1.0, "weight[animals]": 1.0, "weight[junk]": 1.0}
    assert found.best_value >= found.default_value + 0.1
    assert weights["junk"] < 0.5 and weights["junk"] == min(weights.values())
    assert found.confirmed_value == pytest.approx(found.best_value, abs=1e-12)
    written = load_recipe(result.out / "task_arithmetic.yaml")
    assert {m.label: m.weight for m in written.models} == weights and written.parameters["scale"] == 1.0
    summary = json.loads((result.out / "summary.json").read_text())
    assert summary["settings"]["search"] == ["weights:0:1"]
    assert summary["methods"][0]["best_setting"] == {"weights": weights}
    markdown = (result.out / "summary.md").read_text()
    assert "## Chosen weights and scale gradient" in markdown and "| weight junk |" in markdown
    assert "Searched: weights:0:1." in markdown and "method parameters as given" in markdown


def test_cli_refuses_a_bad_search_before_reading_anything(tmp_path, capsys):
    missing = tmp_path / "nothing.yaml"  # the search is checked before the recipe is opened
    assert main(["tune", str(missing), "--tasks", "a.csv", "--search", "weights", "scale-gradient:1"]) == 2
    assert "--search scale-gradient:1: give the number of anchors, 2 to 32" in capsys.readouterr().err


@pytest.fixture(scope="module")
def llm_zoo(tmp_path_factory):
    """test_tuning_llm's tiny Llama base, two fine-tunes and their task files."""
    pytest.importorskip("lm_eval")
    import test_tuning_llm

    return test_tuning_llm.llm_zoo.__wrapped__(tmp_path_factory)


def test_llm_suite_searches_the_genome_from_the_command_line(llm_zoo, tmp_path, capsys):
    """``tune --suite llm --search params weights scale-gradient:2``: lm-eval's validation accuracy is
    the objective; every trial sets both weights and both anchors, and the written recipe carries
    the chosen ones, as the terminal table shows them."""
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(json.dumps({"base": str(llm_zoo["recipe"].base), "method": "task_arithmetic",
                                       "models": [str(m.path) for m in llm_zoo["recipe"].models]}))
    argv = ["tune", str(recipe_file), "--suite", "llm", "--tasks", *llm_zoo["tasks"], "--trials", "3",
            "--validation-size", "8", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "c"),
            "--search", "params", "weights", "scale-gradient:2"]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    with (tmp_path / "out" / "trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3
    assert all(set(json.loads(r["parameters"])) == {"scale[0]", "scale[1]", "weight[ft1]", "weight[ft2]"} for r in rows)
    written = load_recipe(tmp_path / "out" / "task_arithmetic.yaml")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    best = summary["methods"][0]["best_setting"]
    assert written.parameters["scale"] == best["scale"] and len(best["scale"]) == 2
    assert {m.label: m.weight for m in written.models} == best["weights"]
    assert "chosen weights and scale over depth:" in out and "scale=[" in out
