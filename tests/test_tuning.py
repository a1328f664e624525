"""primerge tune on a tiny trained zoo: the test split is never read, a seed reproduces a run, the
best recipe is what ``primerge merge`` gives, the linear-scale cache, search spaces, report, errors."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import replace

import pytest
import torch
import yaml
from tuning_zoo import tuning_zoo  # noqa: F401  (fixture)

import primerge
from primerge.cli.main import main
from primerge.util.errors import InputError
from primerge.evaluation.model import read_tensors, split_head
from primerge.data.tasks import load_task
from primerge.core.recipe import build_recipe, load_recipe
from primerge.tuning import EncoderSuite, TuneSettings, carve, tune
from primerge.tuning.cache import MergedModel, UpdateCache, recipe_with, update_error
from primerge.tuning.run import validation_value

METHODS = ["task_arithmetic", "ties"]


class Poison(Sequence):
    """A test split that fails the run the moment anything reads it."""

    def __getitem__(self, index):
        raise AssertionError("the test split was read")

    def __len__(self):
        raise AssertionError("the test split was read")

    def __iter__(self):
        raise AssertionError("the test split was read")


def poisoned(splits):
    return [replace(s, test_texts=Poison(), test_labels=Poison()) for s in splits]


def records(result) -> list[tuple]:
    return [(t.method, t.number, t.state, t.value, json.dumps(t.params, sort_keys=True))
            for r in result.results for t in r.trials]


@pytest.fixture(scope="module")
def recipe(tuning_zoo):
    return build_recipe(tuning_zoo["recipe"])


def test_validation_is_carved_from_the_training_split_only(tuning_zoo):
    split = tuning_zoo["splits"][0]
    held = carve(poisoned([split])[0], size=50)
    assert held == carve(split, size=50)  # deterministic, and never touched the test split
    assert len(held.texts) == min(50, int(0.2 * len(split.train_texts)))
    pairs = set(zip(split.train_texts, split.train_labels))
    assert all(pair in pairs for pair in zip(held.texts, held.labels))
    assert len(set(held.texts)) == len(held.texts)
    assert len(carve(split, size=3).texts) == 3
    with pytest.raises(InputError, match="validation size"):
        carve(split, size=0)


def test_tuner_never_reads_the_test_split(tuning_zoo, recipe, tmp_path):
    suite = EncoderSuite(recipe, poisoned(tuning_zoo["splits"]), size=20, cache=tmp_path / "c")
    result = tune(recipe, suite, METHODS, TuneSettings(trials=3), out=tmp_path / "out", log=lambda m: None)
    assert [r.method for r in result.results] == METHODS
    assert all(r.confirmed_value is not None for r in result.results)


def _poison_files(files, folder):
    """Copies of the task files whose test rows have other texts and other labels."""
    out = []
    for path in files:
        data = load_task(path)
        test = set(data.split().test_texts)
        rows = []
        for i, (text, label) in enumerate(zip(data.texts, data.labels)):
            if text in test:
                text, label = f"poison {i} red dog big", (label + 1) % len(data.classes)
            rows.append({"text": text, "label": data.classes[label]})
        target = folder / f"{data.name}.jsonl"
        target.write_text("".join(json.dumps(row) + "\n" for row in rows))
        out.append(str(target))
    return out


def _tune_cli(recipe_file, files, out, cache, *extra) -> int:
    return main(["tune", str(recipe_file), "--tasks", *files, "--methods", *METHODS, "--trials", "5",
                 "--validation-size", "20", "--out", str(out), "--cache", str(cache), "--quiet", *extra])


def _trials_without_seconds(path):
    with path.open() as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def cli_run(tuning_zoo, tmp_path_factory):
    """``primerge tune`` from the command line on the clean task files."""
    folder = tmp_path_factory.mktemp("cli-tune")
    recipe_file = folder / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(tuning_zoo["recipe"]))
    assert _tune_cli(recipe_file, tuning_zoo["files"], folder / "out", folder / "cache") == 0
    return {"folder": folder, "recipe": recipe_file, "out": folder / "out"}


def test_a_poisoned_test_split_changes_nothing(tuning_zoo, cli_run, tmp_path):
    files = _poison_files(tuning_zoo["files"], tmp_path)
    assert [load_task(f).split().train_texts for f in files] == [s.train_texts for s in tuning_zoo["splits"]]
    assert _tune_cli(cli_run["recipe"], files, tmp_path / "out", tmp_path / "cache") == 0
    assert _trials_without_seconds(tmp_path / "out" / "trials.csv") == _trials_without_seconds(cli_run["out"] / "trials.csv")
    for method in METHODS:
        assert (tmp_path / "out" / f"{method}.yaml").read_text() == (cli_run["out"] / f"{method}.yaml").read_text()


def test_a_seed_reproduces_the_run(tuning_zoo, recipe, tmp_path):
    def run(seed, cache):
        suite = EncoderSuite(recipe, tuning_zoo["splits"], size=20, cache=tmp_path / cache)
        return tune(recipe, suite, ["ties"], TuneSettings(trials=5, seed=seed), log=lambda m: None)

    first, again, other = run(0, "a"), run(0, "b"), run(7, "c")
    assert records(first) == records(again)
    assert [r.best_params for r in first.results] == [r.best_params for r in again.results]
    assert records(first) != records(other)
    assert records(first)[0] == records(other)[0]  # trial 0 is the defaults either way


def test_the_best_recipe_is_what_primerge_merge_writes(tuning_zoo, recipe, cli_run, tmp_path):
    summary = json.loads((cli_run["out"] / "summary.json").read_text())
    suite = EncoderSuite(recipe, tuning_zoo["splits"], size=20, cache=tmp_path / "scores")
    for entry in summary["methods"]:
        path = cli_run["out"] / f"{entry['method']}.yaml"
        tuned = load_recipe(path)
        assert tuned.method == entry["method"]
        assert {k: tuned.parameters[k] for k in entry["best_params"]} == entry["best_params"]
        out = tmp_path / entry["method"]
        assert main(["merge", str(path), "--out", str(out), "--quiet"]) == 0
        body, _ = split_head(read_tensors(out))
        heads = {p.stem: read_tensors_file(p) for p in (out / "task_heads").glob("*.safetensors")}
        written = MergedModel(body, None, heads)
        assert validation_value(suite, written) == entry["confirmed_value"]
        assert entry["confirmed_value"] == pytest.approx(entry["best_value"], abs=1e-12)
        in_memory = primerge.merge_recipe(path).state_dict
        assert all(torch.equal(in_memory[k], v) for k, v in body.items())


def read_tensors_file(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_report_files(cli_run):
    out = cli_run["out"]
    with (out / "trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == ["task_arithmetic"] * 5 + ["ties"] * 5
    assert {r["state"] for r in rows} <= {"complete", "pruned", "repeat"}
    assert rows[0]["parameters"] == json.dumps({"scale": 1 / 3})  # the defaults first (λ = 1/T)
    assert set(rows[0]) >= {"colors", "animals", "sizes", "normalized", "merged"}
    for method in METHODS:
        assert (out / "plots" / f"{method}-history.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert [m["method"] for m in summary["methods"]] == METHODS
    assert all(m["best_value"] >= m["default_value"] for m in summary["methods"])
    assert "| method | trials |" in (out / "summary.md").read_text()


def test_scale_only_trials_reuse_one_merge(recipe):
    cache = UpdateCache(recipe_with(recipe, {}, None), "scale")
    for lam in (0.2, 0.5, 0.9, 0.2):
        built = cache.build({"scale": lam})
        real = primerge.merge_recipe(recipe_with(recipe, {"scale": lam}, None))
        assert update_error(cache.base_state(), built.model.state, real.state_dict) < 1e-6
    assert cache.merges == 2  # λ = 1 once, plus the one-off linearity check at λ = 1/2
    assert cache.linear


def test_knots_inner_scale_trials_reuse_one_merge(recipe):
    """KnOTS's output U·M is linear in its inner TIES's λ: trials at another λ derive from the
    cached merge and equal a real merge with that inner scale."""
    knots = recipe.replace(method="knots")
    cache = UpdateCache(recipe_with(knots, {}, None), "inner_params.scale", log=lambda m: None)
    for lam in (0.6, 1.4):
        built = cache.build({"inner_params.density": 0.3, "inner_params.scale": lam})
        real = primerge.merge_recipe(recipe_with(knots, {"inner_params": {"density": 0.3, "scale": lam}}, None))
        assert update_error(cache.base_state(), built.model.state, real.state_dict) < 1e-6
    assert cache.linear and cache.merges == 2


def test_a_scale_that_is_not_linear_merges_every_trial(recipe):
    sb = recipe.replace(method="subspace_boosting")
    cache = UpdateCache(recipe_with(sb, {}, None), "beta", log=lambda m: None)
    built = cache.build({"beta": 0.3})
    assert cache.linear is False and built.merged
    real = primerge.merge_recipe(recipe_with(sb, {"beta": 0.3}, None))
    assert all(torch.equal(real.state_dict[k], v) for k, v in built.model.state.items())


def test_input_errors_are_one_line(tuning_zoo, cli_run, tmp_path, capsys):
    recipe_file = cli_run["recipe"]
    files = tuning_zoo["files"]
    assert main(["tune", str(recipe_file), "--tasks", *files[:2], "--out", str(tmp_path / "o")]) == 2
    assert "2 task(s) for 3 model(s)" in capsys.readouterr().err
    no_heads = tmp_path / "no-heads.yaml"
    no_heads.write_text(yaml.safe_dump({k: v for k, v in tuning_zoo["recipe"].items() if k != "task_specific"}))
    assert main(["tune", str(no_heads), "--tasks", *files, "--out", str(tmp_path / "o")]) == 2
    assert "task_specific" in capsys.readouterr().err
    assert main(["tune", str(recipe_file), "--tasks", *files, "--methods", "tiess", "--out", str(tmp_path / "o"),
                 "--cache", str(tmp_path / "c")]) == 2
    assert "Did you mean 'ties'" in capsys.readouterr().err


def test_demo_tuned_adds_the_tuned_table(tuning_zoo, tmp_path):
    from primerge.tuning.demo import run_tuned_demo
    from tuning_zoo import PROTOCOL

    report = tmp_path / "report"
    base = tuning_zoo["root"] / "base"
    result = run_tuned_demo(TuneSettings(trials=2, validation_size=20), report=report, log=lambda m: None,
                            tasks=tuning_zoo["files"], methods=["task_arithmetic", "emr"], base=base,
                            cache=tuning_zoo["cache"], protocol=PROTOCOL, progress=False,
                            pave=["task_arithmetic"], pave_targets=("weight", "delta"))
    labels = [r.label for r in result.rows]
    assert labels == ["Base (linear probe)", "Individual", "task_arithmetic", "emr (per-task)",
                      "task_arithmetic + PAVE", "task_arithmetic + PAVE delta", "task_arithmetic (tuned)",
                      "emr (per-task) (tuned)", "task_arithmetic + PAVE (tuned)", "task_arithmetic + PAVE delta (tuned)"]
    assert [r.tuned for r in result.rows] == [False] * 6 + [True] * 4
    assert result.timings["tuning_seconds"] > 0
    tuned = load_recipe(report / "tuning" / "task_arithmetic.yaml")
    row = result.rows[6]
    merged = primerge.merge_recipe(report / "tuning" / "task_arithmetic.yaml")
    assert row.parameters == merged.parameters and tuned.params.scale == merged.parameters["scale"]
    pave = load_recipe(report / "tuning" / "pave-delta" / "task_arithmetic.yaml")
    defaults = primerge.get_method(pave.method).parameters().model_dump(mode="json", exclude_none=True)
    assert pave.parameters == defaults  # the method at its defaults: only PAVE was tuned
    assert pave.purify is None or pave.purify["target"] == "delta"
    markdown = (report / "results.md").read_text()
    assert "## Tuned on validation data" in markdown and "| task_arithmetic (tuned) |" in markdown
    assert markdown.index("| task_arithmetic |") < markdown.index("## Tuned on validation data")
    assert (report / "results-tuned.png").read_bytes()[:4] == b"\x89PNG"
    assert {"trials.csv", "summary.md", "plots"} <= {p.name for p in (report / "tuning").iterdir()}
    from primerge.cli.main import build_parser
    from primerge.cli.tune import settings_from

    args = build_parser().parse_args(["demo", "--tuned", "--trials", "7", "--budget", "3", "--validation-size", "40",
                                      "--pave", "ties", "--pave-targets", "weight", "delta"])
    assert args.tuned and args.pave_targets == ["weight", "delta"]
    assert settings_from(args) == TuneSettings(trials=7, budget_minutes=3.0, validation_size=40)


@pytest.mark.parametrize("spec", primerge.list_methods(), ids=lambda s: s.name)
def test_every_point_of_a_registered_space_is_valid(spec):
    from primerge.tuning.spaces import INNER_PREFIX, Choice, defaults_in_space, nested, space_for

    space = space_for(spec)
    first = defaults_in_space(spec, space, 3)
    dims = space.dimensions(3, first)
    for name, dim in dims.items():
        values = dim.values if isinstance(dim, Choice) else (dim.low, dim.high)
        for value in values:
            spec.parameters(nested({**first, name: value})).model_dump()  # raises on an invalid value
    params = spec.parameters({})
    defaults, fields = params.model_dump(), set(spec.params_model.model_fields)
    if hasattr(params, "inner_parameters"):  # KnOTS, Core Space: the inner merge's space and defaults
        inner = params.inner_parameters()
        defaults.update({INNER_PREFIX + k: v for k, v in inner.model_dump().items()})
        fields |= {INNER_PREFIX + k for k in type(inner).model_fields}
        assert space.source == f"inner merge {params.inner}" and set(dims) <= fields
    for name, value in first.items():  # the first trial is the defaults (an unset scale: 1/T)
        assert value == defaults[name] or (defaults[name] is None and value == pytest.approx(1 / 3))
    if space.scale is not None:
        assert space.scale.name in fields


def test_an_aligned_method_tunes_its_inner_merge():
    """KnOTS (inner TIES by default) searches TIES's density and scale inside the aligned space;
    a recipe that fixes another inner merge gets that one's space; points nest into inner_params."""
    from primerge.methods.base import get_method
    from primerge.tuning.spaces import SPACES, Choice, defaults_in_space, nested, space_for

    knots = get_method("knots")
    space = space_for(knots)
    assert space.params == {"inner_params.density": SPACES["ties"].params["density"]}
    assert space.scale.name == "inner_params.scale" and space.scale.reference == 1.0
    assert defaults_in_space(knots, space, 4) == {"inner_params.density": 0.2, "inner_params.scale": 1.0}
    tsv_inside = space_for(get_method("core_space"), {"inner": "tsv"})
    assert tsv_inside.params == {} and tsv_inside.scale.name == "inner_params.scale"
    prime_inside = space_for(knots, {"inner": "prime"})
    assert prime_inside.params["inner_params.rank"] == Choice((0.005, 0.01, 0.02, 0.04, 0.08))
    point = {"inner": "ties", "inner_params": {"k": 1}, "inner_params.density": 0.1, "inner_params.scale": 1.5}
    assert nested(point) == {"inner": "ties", "inner_params": {"k": 1, "density": 0.1, "scale": 1.5}}
    assert knots.parameters(nested({"inner_params.density": 0.3})).inner_parameters().density == 0.3


def test_a_new_method_declares_its_space_on_its_fields():
    from pydantic import Field

    from primerge.methods.base import MethodParams, MethodSpec, scale_field
    from primerge.tuning.spaces import Choice, Range, space_for

    class Params(MethodParams):
        depth: int = Field(2, json_schema_extra={"tune": [1, 2, 4]})
        temperature: float = Field(0.5, json_schema_extra={"tune": {"low": 0.1, "high": 1.0, "log": False}})
        scale: float | None = scale_field(None, "λ")

    spec = MethodSpec("brand_new", "a method the registry does not know", Params, lambda taus, ctx, p: taus.sum())
    space = space_for(spec)
    assert space.source == "field hints"
    assert space.params == {"depth": Choice((1, 2, 4)), "temperature": Range(0.1, 1.0, log=False)}
    assert space.dimensions(4)["scale"] == Range(1 / 16, 1.0)  # the generic rule: 1/T × [1/4, 4]

    class Plain(MethodParams):
        scale: float = scale_field(2.0, "α")

    bare = space_for(MethodSpec("bare", "", Plain, lambda taus, ctx, p: taus.sum()))
    assert bare.source == "generic rule" and bare.dimensions(4) == {"scale": Range(0.5, 8.0)}


def test_a_failing_setting_fails_its_trial_only(tuning_zoo, recipe, tmp_path, monkeypatch):
    from primerge.util.errors import RecipeError

    build = UpdateCache.build

    def refuse_dense(self, parameters, purify=None, weights=None):
        if parameters.get("density", 0.2) >= 0.3:
            raise RecipeError("density refused here")
        return build(self, parameters, purify, weights)

    monkeypatch.setattr(UpdateCache, "build", refuse_dense)
    suite = EncoderSuite(recipe, tuning_zoo["splits"], size=20, cache=tmp_path / "c")
    result = tune(recipe, suite, ["ties"], TuneSettings(trials=8, seed=3), log=lambda m: None)
    states = [t.state for t in result.results[0].trials]
    assert "failed" in states and states[0] == "complete"
    assert result.results[0].best_params["density"] < 0.3
    monkeypatch.setattr(UpdateCache, "build", lambda self, p, purify=None, weights=None: (_ for _ in ()).throw(RecipeError("bad")))
    with pytest.raises(RecipeError, match="bad"):
        tune(recipe, suite, ["ties"], TuneSettings(trials=3), log=lambda m: None)
