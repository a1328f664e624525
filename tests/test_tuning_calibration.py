"""primerge tune with a data-aware method (RegMean): the tuning run adds the ``calibration:`` block a
recipe without one needs, from the tasks it was given, so every trial merges and the best recipe
merges again from its YAML alone; a recipe's own block is kept; relative task files are re-expressed
from the report folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from tuning_zoo import tuning_zoo  # noqa: F401  (fixture)

import primerge
from primerge.cli.main import main
from primerge.core.recipe import build_recipe
from primerge.tuning import EncoderSuite, TuneSettings, tune
from primerge.util.errors import RecipeError


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """The covariance files of each test in its own cache."""
    monkeypatch.setenv("PRIMERGE_CACHE", str(tmp_path / "primerge-cache"))


def same_merge(path, expected: dict[str, torch.Tensor]) -> None:
    """The recipe file merges (from another working folder) to ``expected``, bit for bit."""
    merged = primerge.merge_recipe(path).state_dict
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], v) for k, v in expected.items())


def test_primerge_tune_adds_the_block_a_data_aware_method_needs(tuning_zoo, tmp_path, monkeypatch):
    """``primerge tune`` on a recipe without calibration, ``--methods regmean``: the trials calibrate on
    the --tasks files and the best recipe's YAML has ``calibration: {data: {<model>: <task file>}}``;
    merged from that file alone it is RegMean with that block at the tuned parameters."""
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(tuning_zoo["recipe"]))
    files = tuning_zoo["files"]
    out = tmp_path / "out"
    assert main(["tune", str(recipe_file), "--tasks", *files, "--methods", "regmean", "--trials", "2",
                 "--validation-size", "20", "--out", str(out), "--cache", str(tmp_path / "scores"), "--quiet"]) == 0
    best = yaml.safe_load((out / "regmean.yaml").read_text())
    labels = build_recipe(tuning_zoo["recipe"]).model_labels()
    assert best["method"] == "regmean" and best["calibration"] == {"data": dict(zip(labels, files))}
    expected = primerge.merge(tuning_zoo["recipe"]["base"], tuning_zoo["recipe"]["models"], "regmean",
                              task_specific=tuning_zoo["recipe"]["task_specific"], seed=42,
                              parameters=best["parameters"], calibration=best["calibration"]).state_dict
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    same_merge(out / "regmean.yaml", expected)


def test_a_recipes_own_block_is_kept_and_relative_task_files_move_with_the_report(tuning_zoo, tmp_path, monkeypatch):
    """The API with task files relative to the working folder (as ``demo --tuned`` passes them): the
    best recipe names them relative to the report folder and merges from anywhere. A recipe with its
    own block keeps it (its samples, its data), whatever the run's tasks."""
    monkeypatch.chdir(tuning_zoo["root"])
    relative = [os.path.relpath(f) for f in tuning_zoo["files"]]
    recipe = build_recipe(tuning_zoo["recipe"])
    labels = recipe.model_labels()
    suite = EncoderSuite(recipe, tuning_zoo["splits"], size=20, cache=tmp_path / "scores")
    settings = TuneSettings(trials=1, task_data=dict(zip(labels, relative)))
    run = tune(recipe, suite, ["regmean"], settings, out=tmp_path / "out", log=lambda m: None)
    written = yaml.safe_load(run.results[0].recipe_path.read_text())
    data = written["calibration"]["data"]
    assert all(not os.path.isabs(p) and (tmp_path / "out" / p).resolve() == Path(f).resolve()
               for p, f in zip(data.values(), relative))
    monkeypatch.chdir(tmp_path)
    same_merge(run.results[0].recipe_path, primerge.merge_recipe(recipe.replace(
        method="regmean", parameters=written["parameters"], calibration={"data": dict(zip(labels, tuning_zoo["files"]))}
    )).state_dict)

    own = recipe.replace(calibration={"data": dict(zip(labels, tuning_zoo["files"][::-1])), "samples": 64})
    kept = tune(own, suite, ["regmean"], TuneSettings(trials=1, task_data=dict(zip(labels, tuning_zoo["files"]))),
                log=lambda m: None).results[0].recipe
    assert kept.calibration == own.calibration


def test_a_recipe_files_own_relative_task_files_are_its_folders_wherever_tune_runs(tuning_zoo, tmp_path,
                                                                                 monkeypatch):
    """``primerge tune`` on a recipe file whose ``calibration:`` names task files relative to the
    recipe's folder, run from another working folder: every trial calibrates on those files (read
    relative to the recipe, as ``primerge merge`` reads them), and the best recipe merges from the
    report to the same model as the recipe with absolute paths."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    labels = build_recipe(tuning_zoo["recipe"]).model_labels()
    own = {label: os.path.relpath(f, recipes) for label, f in zip(labels, tuning_zoo["files"][::-1])}
    (recipes / "recipe.yaml").write_text(yaml.safe_dump({**tuning_zoo["recipe"], "method": "regmean",
                                                         "calibration": {"data": own}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["tune", "../recipes/recipe.yaml", "--tasks", *tuning_zoo["files"], "--trials", "1",
                 "--validation-size", "20", "--out", "out", "--cache", str(tmp_path / "scores"), "--quiet"]) == 0
    absolute = {label: str((recipes / f).resolve()) for label, f in own.items()}
    best = yaml.safe_load((elsewhere / "out" / "regmean.yaml").read_text())
    assert {k: str((elsewhere / "out" / v).resolve()) for k, v in best["calibration"]["data"].items()} == absolute
    same_merge(elsewhere / "out" / "regmean.yaml", primerge.merge_recipe(build_recipe(
        {**tuning_zoo["recipe"], "method": "regmean", "parameters": best["parameters"],
         "calibration": {"data": absolute}})).state_dict)


def test_a_data_aware_method_without_tasks_is_refused(tuning_zoo, tmp_path):
    recipe = build_recipe(tuning_zoo["recipe"])
    suite = EncoderSuite(recipe, tuning_zoo["splits"], size=20, cache=tmp_path / "scores")
    with pytest.raises(RecipeError, match="method 'regmean' reads each model's task data, but the tuning run has no "
                                          f"task for model '{recipe.model_labels()[0]}'"):
        tune(recipe, suite, ["regmean"], TuneSettings(trials=1), log=lambda m: None)
