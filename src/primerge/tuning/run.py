"""``primerge tune`` end to end: one study per method, the best recipe written and merged for real.

For each method: its study (:func:`primerge.tuning.study.tune_method`), then the best setting is
written as a recipe YAML and merged again through :func:`primerge.merge_recipe` *from that file*,
and that merge is scored on validation (``confirmed``): what a user gets from
``primerge merge <method>.yaml`` is what was measured. The test split is never touched here.

A recipe's relative paths are relative to the file they are written in: the best recipe keeps
the input recipe's absolute paths and re-expresses its relative ones (base, models, and the
.csv/.jsonl task files of its ``calibration:`` and ``purify:`` data) from the report folder
(:func:`relocated`), so it merges from the report wherever the input recipe lived.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from primerge.api import merge_recipe
from primerge.data.tasks import is_table_spec
from primerge.evaluation.llm.estimates import Score
from primerge.util.errors import OutputError
from primerge.io.destination import destination
from primerge.io.manifest import Ledger
from primerge.io.writer import atomic_folder
from primerge.methods import get_method
from primerge.core.recipe import Recipe
from primerge.engine.ray_session import RaySession
from primerge.tuning.cache import MergedModel
from primerge.tuning.settings import TuneSettings
from primerge.tuning.study import MethodResult, normalized, remaining_timeout, tune_method
from primerge.tuning.suites import Suite


@dataclass
class TuneResult:
    """Every method's outcome, with the run's settings, validation data and wall time."""

    results: list[MethodResult]
    settings: TuneSettings
    suite: str
    individual: dict[str, float]
    seconds: float
    out: Path | None
    sizes: dict[str, int] = field(default_factory=dict)  # validation examples per task
    examples: dict[str, str] = field(default_factory=dict)  # how each task's validation set was carved


def validation_scores(suite: Suite, model: MergedModel) -> dict[str, float]:
    """Validation accuracy of a model on every task."""
    return {label: suite.score(model, label) for label in suite.labels}


def validation_value(suite: Suite, model: MergedModel) -> float:
    """Normalized validation accuracy of a model: mean over tasks of score / individual score."""
    return normalized(validation_scores(suite, model), suite.individual())


def relative_from(path: Path, folder: Path) -> Path:
    """``path`` (relative to the working folder) as a path relative to ``folder``. The parents are
    resolved physically (``..`` in a path is followed physically), the last name is kept: a model's
    label is its file or folder name, a link's included."""
    target = Path(os.path.realpath(path.parent)) / path.name
    return Path(os.path.relpath(target, os.path.realpath(folder)))


def relocated(recipe: Recipe, folder: Path) -> Recipe:
    """The recipe as a file in ``folder`` must say it: relative paths re-expressed from ``folder``."""
    def moved(path: Path) -> Path:
        return path if path.is_absolute() else relative_from(path, folder)

    def moved_data(block: dict | None) -> dict | None:
        """A calibration or purify block with its .csv/.jsonl task files moved (task names stay)."""
        if block is None or "data" not in block:
            return block
        data = {label: str(moved(Path(spec).expanduser())) if is_table_spec(spec) else spec
                for label, spec in block["data"].items()}
        return {**block, "data": data}

    models = [entry.model_copy(update={"path": moved(entry.path)}) for entry in recipe.models]
    return recipe.model_copy(update={"base": moved(recipe.base), "models": models, "purify": moved_data(recipe.purify),
                                     "calibration": moved_data(recipe.calibration)})


def confirm(result: MethodResult, suite: Suite, out: Path | None) -> None:
    """Write the best recipe (``out/<method>.yaml``), merge it from the file and score it. ``out`` is
    the report's temporary folder, beside the final one: a path relative to it is relative to both."""
    source: Recipe | Path = result.recipe
    if out is not None:
        path = out / f"{result.method}.yaml"
        try:
            path.write_text(relocated(result.recipe, out).to_yaml())
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc}") from exc
        result.recipe_path = source = path
    result.confirmed_scores = validation_scores(suite, MergedModel.of(merge_recipe(source)))
    result.confirmed_value = normalized(result.confirmed_scores, suite.individual())


def tune(recipe: Recipe, suite: Suite, methods: Sequence[str] | None = None, settings: TuneSettings | None = None,
         out: Path | None = None, log: Callable[[str], None] = print) -> TuneResult:
    """Tune every method in ``methods`` (default: the recipe's) on ``suite``'s validation data.

    With ``out`` the report (best recipes, trials, plots, summary) is written atomically under
    :mod:`primerge.io.destination`'s rules: never over an input, and an existing folder is replaced
    only when it is an earlier tuning report (its manifest says so) or empty. A recipe run on Ray
    runs every trial's merge in one Ray session (:meth:`RaySession.held_for`): its workers start
    once, not once per trial."""
    settings = settings or TuneSettings()
    if out is None:
        return _tune(recipe, suite, methods, settings, None, log)
    from primerge.tuning.report import write_report

    target = destination(out, recipe.inputs(), force=True, kind="tune-report")
    with atomic_folder(target) as folder:
        tuned = _tune(recipe, suite, methods, settings, folder, log)
        write_report(tuned, log)
        Ledger(folder, kind="tune-report").seal()
    for result in tuned.results:
        result.recipe_path = target.path / result.recipe_path.name
    tuned.out = target.path
    return tuned


def _tune(recipe: Recipe, suite: Suite, methods: Sequence[str] | None, settings: TuneSettings, out: Path | None,
          log: Callable[[str], None]) -> TuneResult:
    specs = [get_method(name) for name in methods] if methods else [recipe.spec]
    started = time.perf_counter()
    sizes = {label: len(suite.sets[label].texts) for label in suite.labels}
    log(suite.describe())
    for label in suite.labels:
        log(f"  {label}: {suite.sets[label].origin}")
    individual = suite.individual()
    log("fine-tunes on their own validation sets (accuracy ± standard error): "
        + ", ".join(f"{k} {Score.of(v, sizes[k]).text()}" for k, v in individual.items()))
    results = []
    with RaySession.held_for(recipe.execution):  # one Ray start-up for every trial's merge
        for i, spec in enumerate(specs):
            timeout = remaining_timeout(settings.budget_minutes, started, len(specs) - i)
            log(f"tuning {spec.name} ({settings.trials} trials at most"
                + (f", {timeout / 60:.1f} min" if timeout is not None else "") + ") ...")
            result = tune_method(recipe, spec, suite, settings, timeout, log)
            confirm(result, suite, out)
            log(f"{spec.name}: defaults {100 * result.default_value:.2f} -> tuned {100 * result.best_value:.2f} "
                f"(recipe merged from file: {100 * result.confirmed_value:.2f}), {result.seconds:.0f} s")
            results.append(result)
    return TuneResult(results, settings, suite.describe(), individual, time.perf_counter() - started, out, sizes,
                      {label: suite.sets[label].origin for label in suite.labels})
