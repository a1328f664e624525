"""One Optuna study per method: TPE (seeded), median pruning, the defaults as the first trial.

The objective of a trial is the **normalized validation accuracy**: the mean over tasks of the
merged model's validation accuracy divided by the task's own fine-tune's validation accuracy
(the demo table's "Normalized", on validation data). Tasks are scored one at a time in the
recipe's model order and the running mean is reported after each, so the median pruner stops a
trial whose partial mean falls below the median of earlier trials at the same task (after 4
complete trials, from the second task on).

With PAVE tuning (``pave=True``) a trial also picks ρ ∈ {7/8, 15/16, 31/32, 63/64}, the target
(weight | delta, from ``pave_targets``) and, per model, whether its task vector is purified (the
purified subset; none purified is a plain merge). The first trial is the method's defaults with
PAVE at the authors' ρ for the method on every model, weight target.

With ``--search`` (:mod:`primerge.tuning.genome`) a trial also sets each model's weight and/or the
scale as a gradient of K anchors over depth (in place of one λ), and the method's own parameters
may be left as the recipe gives them; the first trial is then the recipe as given.

A method that reads its inputs' Gram matrices (RegMean, RegMean++) merges with the recipe's
``calibration:`` block; a recipe without one gets ``calibration: {data: {<model>: <task>}}`` from the
run's tasks (``settings.task_data``, read as the suite reads its tasks: its ``calibration`` settings), so every
trial and the best recipe written (which must merge from its YAML alone) carry it
(:func:`method_recipe`). The calibration reads each task's training texts, from which the
validation examples are carved too: the merge sees their inputs, never their labels.

A setting that repeats an earlier trial's (TPE may propose it again on categorical spaces) takes
that trial's result without merging.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from primerge.util.errors import InputError, PrimergeError, RecipeError
from primerge.methods.base import MethodSpec
from primerge.core.calibration_block import block_for
from primerge.core.purify_block import paper_rank_ratio
from primerge.core.recipe import Recipe
from primerge.util.seeding import derive_seed
from primerge.tuning.cache import UpdateCache, recipe_with
from primerge.tuning.genome import MethodSearch, method_search
from primerge.tuning.settings import TuneSettings
from primerge.tuning.spaces import Choice, Dimension, MethodSpace, space_for
from primerge.tuning.suites import Suite

PAVE_PREFIX = "purify."
SWITCH_PREFIX = "purify.tasks."  # + model label: purify this model's task vector or not
PAVE_RATIOS = (7 / 8, 15 / 16, 31 / 32, 63 / 64)
PRUNER_STARTUP = 4


@dataclass
class TrialRecord:
    """One trial as the table shows it."""

    method: str
    number: int
    state: str  # complete | pruned | repeat | failed
    value: float | None  # normalized validation accuracy (fraction), None when pruned
    params: dict[str, Any]
    scores: dict[str, float]  # validation accuracy per task scored
    seconds: float
    merged: bool  # a merge ran (False: derived from a cached update, or a repeat)


@dataclass
class MethodResult:
    """The outcome of one method's study."""

    method: str
    space: str
    default_value: float
    best_params: dict[str, Any]
    best_value: float
    recipe: Recipe
    trials: list[TrialRecord]
    seconds: float
    merges: int
    study: Any = None  # the optuna.Study, for the plots
    confirmed_value: float | None = None  # the written recipe, merged for real, on validation
    confirmed_scores: dict[str, float] = field(default_factory=dict)  # its validation accuracy per task
    recipe_path: Any = None


def normalized(scores: Mapping[str, float], individual: Mapping[str, float]) -> float:
    """Mean over the tasks in ``scores`` of score / the task's own fine-tune's score."""
    return sum(scores[t] / individual[t] for t in scores) / len(scores)


def optuna_module():
    """Optuna, or one clear error naming the install command."""
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InputError("primerge tune needs Optuna: pip install 'primerge[eval]' (optuna==5.0.0)") from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def pave_dimensions(labels: list[str], targets: tuple[str, ...]) -> dict[str, Dimension]:
    """ρ, target and one purify-or-not switch per model (module docstring)."""
    dims: dict[str, Dimension] = {f"{PAVE_PREFIX}rank_ratio": Choice(PAVE_RATIOS)}
    if len(targets) > 1:
        dims[f"{PAVE_PREFIX}target"] = Choice(tuple(targets))
    dims.update({f"{SWITCH_PREFIX}{label}": Choice((True, False)) for label in labels})
    return dims


def pave_defaults(method: str, labels: list[str], targets: tuple[str, ...]) -> dict[str, Any]:
    point: dict[str, Any] = {f"{PAVE_PREFIX}rank_ratio": paper_rank_ratio(method)}
    if len(targets) > 1:
        point[f"{PAVE_PREFIX}target"] = targets[0]
    point.update({f"{SWITCH_PREFIX}{label}": True for label in labels})
    return point


def split_point(point: dict[str, Any], search: MethodSearch, labels: list[str], settings: TuneSettings,
                fixed_purify: dict | None) -> tuple[dict[str, Any], dict | None, dict[str, float] | None]:
    """(method parameters, purify block, the models' weights or ``None``) of a trial's point."""
    own = {k: v for k, v in point.items() if not k.startswith(PAVE_PREFIX)}
    params, weights = search.parameters(own), search.weights(own)
    if not settings.pave:
        return params, fixed_purify, weights
    chosen = [label for label in labels if point[f"{SWITCH_PREFIX}{label}"]]
    if not chosen:
        return params, None, weights
    purify = {**(fixed_purify or {}), "rank_ratio": point[f"{PAVE_PREFIX}rank_ratio"],
              "target": point.get(f"{PAVE_PREFIX}target", settings.pave_targets[0]), "tasks": chosen,
              "data": {label: settings.task_data[label] for label in chosen}}
    return params, purify, weights


class Objective:
    """Optuna's objective for one method (module docstring); keeps a record of every trial."""

    def __init__(self, spec: MethodSpec, search: MethodSearch, dims: dict[str, Dimension], fixed: dict[str, Any],
                 suite: Suite, cache: UpdateCache, settings: TuneSettings, fixed_purify: dict | None, log: Callable):
        self.spec, self.search, self.dims, self.fixed, self.suite, self.cache = spec, search, dims, fixed, suite, cache
        self.settings, self.fixed_purify, self.log = settings, fixed_purify, log
        self.individual = suite.individual()
        self.records: list[TrialRecord] = []
        self.errors: list[PrimergeError] = []
        self._seen: dict[str, TrialRecord] = {}

    def __call__(self, trial) -> float:
        start = time.perf_counter()
        point = {name: dim.suggest(trial, name) for name, dim in self.dims.items()}
        key = json.dumps(point, sort_keys=True)
        if key in self._seen:
            return self._repeat(trial, point, self._seen[key], start)
        scores: dict[str, float] = {}
        try:
            return self._run(trial, point, key, scores, start)
        except PrimergeError as exc:  # a setting the method refuses: the trial fails, the study goes on
            self.errors.append(exc)
            self._record(trial.number, "failed", None, point, scores, start, False, key, f"failed: {exc}")
            raise

    def _run(self, trial, point: dict, key: str, scores: dict, start: float) -> float:
        params, purify, weights = split_point(point, self.search, self.suite.labels, self.settings, self.fixed_purify)
        built = self.cache.build({**self.fixed, **params}, purify, weights)
        for step, label in enumerate(self.suite.labels):
            scores[label] = self.suite.score(built.model, label)
            value = normalized(scores, self.individual)
            trial.report(value, step)
            if step < len(self.suite.labels) - 1 and trial.should_prune():
                self._record(trial.number, "pruned", None, point, scores, start, built.merged, key)
                raise optuna_module().TrialPruned()
        self._record(trial.number, "complete", value, point, scores, start, built.merged, key)
        return value

    def _repeat(self, trial, point: dict, earlier: TrialRecord, start: float) -> float:
        self._record(trial.number, "repeat", earlier.value, point, earlier.scores, start, False, None)
        if earlier.state == "failed":
            raise self.errors[-1]
        if earlier.value is None:
            raise optuna_module().TrialPruned()
        return earlier.value

    def _record(self, number: int, state: str, value: float | None, point: dict, scores: dict, start: float,
                merged: bool, key: str | None, note: str | None = None) -> None:
        record = TrialRecord(self.spec.name, number, state, value, dict(point), dict(scores),
                             time.perf_counter() - start, merged)
        self.records.append(record)
        if key is not None:
            self._seen[key] = record
        shown = note or (f"{100 * value:.2f}" if value is not None else f"pruned after {len(scores)} task(s)")
        self.log(f"  {self.spec.name} trial {number}: {shown}  {_point_text(point)}  ({record.seconds:.1f} s"
                 f"{', merged' if merged else ''})")


def _point_text(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())


def method_recipe(recipe: Recipe, spec: MethodSpec, settings: TuneSettings,
                  reading: Mapping[str, Any]) -> tuple[Recipe, dict[str, Any]]:
    """The recipe with ``spec`` as its method, and the parameters the study keeps fixed: the
    recipe's own parameters when it names this method, else none (the registered defaults). A
    recipe's own ``calibration:`` block is kept; without one, a method that reads Gram matrices
    gets the run's tasks as its block, read as the suite reads them (``reading``: the suite's
    ``calibration`` settings, e.g. the LLM track's prompt templates; module docstring)."""
    fixed = dict(recipe.parameters) if recipe.method == spec.name else {}
    calibration = recipe.calibration
    if calibration is None and spec.reads_grams is not None:
        missing = [label for label in recipe.model_labels() if label not in settings.task_data]
        if missing:
            raise RecipeError(f"method '{spec.name}' reads each model's task data, but the tuning run has no task for "
                              f"model '{missing[0]}'; give one task per model (--tasks) or a calibration: block.")
        data = {label: settings.task_data[label] for label in recipe.model_labels()}
        calibration = block_for(spec, data, **reading)
    return recipe.replace(method=spec.name, parameters=fixed, calibration=calibration), fixed


def tune_method(recipe: Recipe, spec: MethodSpec, suite: Suite, settings: TuneSettings, timeout: float | None,
                log: Callable[[str], None] = print) -> MethodResult:
    """Run one method's study and return its best setting (confirmed by :func:`primerge.tuning.run.confirm`)."""
    optuna = optuna_module()
    start = time.perf_counter()
    labels = suite.labels
    base, fixed = method_recipe(recipe, spec, settings, suite.calibration)
    shared = recipe.settings.uniform() if recipe.method == spec.name else {}  # a gradient has no one value
    space: MethodSpace = space_for(spec, shared)
    search = method_search(spec, space, recipe, shared, labels, settings.method_params, settings.genome)
    for note in search.notes:
        log(f"  {spec.name}: {note}")
    first, dims = dict(search.first), dict(search.dims)
    if settings.pave:
        dims.update(pave_dimensions(labels, settings.pave_targets))
        first.update(pave_defaults(spec.name, labels, settings.pave_targets))
    cache = UpdateCache(base, space.scale.name if space.scale else None, settings.cache_bytes, log=log)
    objective = Objective(spec, search, dims, fixed, suite, cache, settings, recipe.purify, log)
    study = optuna.create_study(
        direction="maximize", study_name=spec.name,
        sampler=optuna.samplers.TPESampler(seed=derive_seed(settings.seed, spec.name) % 2**32),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP, n_warmup_steps=1))
    study.enqueue_trial(first)
    study.optimize(objective, n_trials=settings.trials if dims else 1, timeout=timeout, catch=(PrimergeError,))
    if objective.records[0].state == "failed":  # the defaults themselves fail: bad input, not a bad setting
        raise objective.errors[0]
    best = study.best_trial
    params, purify, weights = split_point(dict(best.params), search, labels, settings, recipe.purify)
    tuned = recipe_with(base, {**fixed, **params}, purify, weights)
    return MethodResult(spec.name, search.describe(dims), objective.records[0].value,
                        dict(best.params), best.value, tuned, objective.records, time.perf_counter() - start,
                        cache.merges, study)


def remaining_timeout(budget_minutes: float | None, started: float, methods_left: int) -> float | None:
    """An equal share of what is left of the budget for each method still to tune."""
    if budget_minutes is None:
        return None
    left = 60 * budget_minutes - (time.perf_counter() - started)
    return max(1.0, left / max(1, methods_left)) if math.isfinite(left) else None
