"""``primerge demo --tuned``: the defaults table, then every method at its tuned setting.

1. The demo as usual (:func:`primerge.evaluation.demo.run_demo`): zoo, Base, Individual, each
   method at its defaults, PAVE rows at the authors' ρ.
2. ``primerge tune`` on the zoo's models with the encoder suite (validation carved from each
   task's training split; the test split is not read), one study per method. With ``pave`` the
   PAVE methods get one more study per target that searches only the PAVE settings (ρ and the
   purified subset; the method at its defaults, no ``--search`` genome), so "paper ρ" and "tuned ρ"
   differ in nothing else. ``--search`` (``settings.method_params`` and ``genome``) sets what each
   method's own study searches, as for ``primerge tune``.
3. Each best recipe, merged from its YAML file, is scored on the test split once: the tuned table.

The report folder gets the demo's files with the tuned table added, and ``tuning/`` (the best
recipes, trials.csv, Optuna's plots and summary.md of each tuning run). The tuned rows' labels,
settings and timings (:func:`tested_rows`) are shared with ``primerge demo --suite llm --tuned``
(:mod:`primerge.tuning.llm_demo`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from primerge.api import merge_recipe
from primerge.data.tasks import DEFAULT_TASKS
from primerge.evaluation.demo import (DemoResult, Row, report_destination, report_folder, run_demo, scored_row,
                                      select_methods, write_report)
from primerge.evaluation.model import HEAD_REGEX
from primerge.io.hf import load_tokenizer
from primerge.core.recipe import build_recipe
from primerge.tuning.report import setting_text
from primerge.tuning.run import TuneResult, tune
from primerge.tuning.settings import TuneSettings
from primerge.tuning.study import MethodResult
from primerge.tuning.suites import EncoderSuite


def tuned_setting(result: MethodResult) -> str:
    """A tuned row's setting in words: the best setting, the normalized validation value of its recipe
    merged from the file against the defaults', and the study's trials and minutes."""
    return (f"{setting_text(result.best_params)} (normalized validation {100 * result.confirmed_value:.1f}, "
            f"defaults {100 * result.default_value:.1f}; {len(result.trials)} trials, "
            f"{result.seconds / 60:.1f} min)")


def tuned_label(result: MethodResult, pave_target: str | None = None) -> str:
    """'ties (tuned)', 'emr (per-task) (tuned)', 'prime + PAVE delta (tuned)' (a study of PAVE's settings)."""
    per_task = " (per-task)" if result.recipe.spec.per_task else ""
    pave = "" if pave_target is None else " + PAVE" + (" delta" if pave_target == "delta" else "")
    return f"{result.method}{per_task}{pave} (tuned)"


#: A tuning run and the PAVE target its studies searched (``None``: each method's own settings).
TuningRun = tuple[TuneResult, str | None]


def tested_rows(runs: Sequence[TuningRun], tested: Callable[[MethodResult, str], Row], timings: dict[str, float],
                started: float, log: Callable[[str], None], prefix: str = "") -> list[Row]:
    """The tuned rows of both demos: each best recipe of ``runs`` scored on the test split once by
    ``tested(result, label)``, labelled (:func:`tuned_label`) and given its setting (:func:`tuned_setting`).

    ``timings`` gets ``<prefix>tuning_seconds`` (from ``started``, when tuning began, to now) and
    ``<prefix>tuned_test_seconds``, both added to ``total_seconds``."""
    tuning = timings[f"{prefix}tuning_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    rows = []
    for run, target in runs:
        for result in run.results:
            row = tested(result, tuned_label(result, target))
            row.tuned, row.setting = True, tuned_setting(result)
            log(f"{row.label}: test avg {100 * row.average:.1f}%")
            rows.append(row)
    testing = timings[f"{prefix}tuned_test_seconds"] = time.perf_counter() - started
    timings["total_seconds"] += tuning + testing
    return rows


def tested_row(result: MethodResult, label: str, demo: DemoResult, max_length: int) -> Row:
    """The tuned recipe merged from its file and scored on the test split, once."""
    zoo = demo.zoo
    start = time.perf_counter()
    merged = merge_recipe(result.recipe_path or result.recipe)
    return scored_row(merged, label, zoo, demo.splits, load_tokenizer(zoo.base), zoo.heads(), max_length,
                      time.perf_counter() - start)


def run_tuned_demo(settings: TuneSettings, report: str | Path | None = "demo-report", log: Callable[[str], None] = print,
                   **options) -> DemoResult:
    """The demo's defaults table plus the tuned table (module docstring); ``options`` are
    :func:`primerge.evaluation.demo.run_demo`'s. The report is written atomically, as the demo's."""
    target = report_destination(report, options.get("tasks", DEFAULT_TASKS), options.get("base"), options.get("cache"))
    demo = run_demo(report=None, log=log, **options)
    with report_folder(target) if target is not None else nullcontext() as folder:
        add_tuned_rows(demo, settings, options.get("methods"), folder / "tuning" if folder else None, log)
        if folder is not None:
            write_report(replace(demo, report=folder), demo.zoo, demo.protocol, demo.seed)
    demo.report = target.path if target is not None else None
    return demo


def add_tuned_rows(demo: DemoResult, settings: TuneSettings, methods: Sequence[str] | None, folder: Path | None,
                   log: Callable[[str], None]) -> None:
    """Tune every method (and its PAVE settings) on validation data, then score each best recipe on test."""
    zoo, protocol = demo.zoo, demo.protocol
    recipe = build_recipe({"base": str(zoo.base), "models": [str(p) for p in zoo.paths],
                           "task_specific": HEAD_REGEX, "seed": demo.seed})
    suite = EncoderSuite(recipe, demo.splits, settings.validation_size, zoo.root, protocol.max_length)
    started = time.perf_counter()
    names = [s.name for s in select_methods(methods, len(zoo.paths))]
    data = dict(zip(suite.labels, demo.task_specs))
    runs: list[tuple[TuneResult, str | None]] = [(tune(recipe, suite, names, replace(settings, task_data=data), folder,
                                                       log), None)]
    for target in demo.pave_targets if demo.pave else ():
        pave_settings = replace(settings, pave=True, method_params=False, genome=None, pave_targets=(target,),
                                task_data=data)
        sub = folder / f"pave-{target}" if folder is not None else None
        runs.append((tune(recipe, suite, demo.pave, pave_settings, sub, log), target))
    demo.rows += tested_rows(runs, lambda result, label: tested_row(result, label, demo, protocol.max_length),
                             demo.timings, started, log)
