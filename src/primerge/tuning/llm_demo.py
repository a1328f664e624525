"""``primerge demo --suite llm --tuned``: the LLM demo's tables, then every method tuned on validation data.

1. The demo as usual (:func:`primerge.evaluation.llm.demo.run_llm_demo`): per zoo (LoRA adapters,
   full fine-tunes) the zero-shot base, Individual and each method at its defaults.
2. Per zoo, ``primerge tune`` with the LLM suite (:class:`~primerge.tuning.llm_suite.LLMSuite`) on that
   zoo's fine-tunes: the ones the defaults table scored, found again in the zoo's cache (never
   trained again). One study per method; ``settings`` give trials, budget, validation size, the TPE
   seed and ``--search``; each model's task (as the user named it) is ``task_data``, the data a
   data-aware method (RegMean) calibrates on, read as prompts as the defaults rows read it
   (:func:`~primerge.evaluation.llm.prompts.prompt_calibration`, the suite's ``calibration``). Each task's validation prompts are carved from the
   training examples the fine-tunes did *not* train on: they trained on the first
   ``protocol.train_size`` (:func:`primerge.tuning.holdout.carve` with ``trained_on``), so a
   validation score is not inflated by memorised examples. The test split is not read.
3. Each best recipe, merged from its YAML file, is scored on the test prompts once, by lm-eval as
   the defaults rows are: the zoo's tuned table, each row with its setting, the normalized
   validation value of its recipe against the defaults', its trials and minutes
   (:func:`primerge.tuning.demo.tested_rows`, shared with the encoder's ``demo --tuned``).

The report folder gets llm-results.* with the tuned tables (:mod:`primerge.evaluation.llm.report`)
and ``tuning/<zoo>/`` (best recipes, trials.csv, plots, summary.md of each zoo's run), written
atomically: nothing is in place until every table is.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from primerge.api import merge_recipe
from primerge.core.recipe import build_recipe
from primerge.data.tasks import load_splits
from primerge.evaluation.demo import report_destination, report_folder
from primerge.evaluation.llm.demo import (LLMDemoResult, LLMRow, Suite, method_names, prepare_suite,
                                          run_llm_demo, scored)
from primerge.evaluation.llm.estimates import Score
from primerge.evaluation.llm.models import checked_device, model_from_state
from primerge.evaluation.llm.prompts import PromptTask
from primerge.evaluation.llm.report import REPORT_FILES, write_llm_report
from primerge.evaluation.llm.zoo import LLMZoo, build_llm_zoo
from primerge.evaluation.model import folder_fingerprint
from primerge.tuning.cache import MergedModel
from primerge.tuning.demo import tested_rows
from primerge.tuning.holdout import carve
from primerge.tuning.llm_suite import LLMSuite
from primerge.tuning.run import TuneResult, tune
from primerge.tuning.settings import TuneSettings
from primerge.tuning.study import MethodResult
from primerge.util.hashing import state_digest


def demo_arguments(**options) -> dict:
    """:func:`run_llm_demo`'s arguments as given, its own defaults for the rest."""
    bound = inspect.signature(run_llm_demo).bind(**options)
    bound.apply_defaults()
    return dict(bound.arguments)


def run_tuned_llm_demo(settings: TuneSettings, report: str | Path | None = "demo-report",
                       log: Callable[[str], None] = print, **options) -> LLMDemoResult:
    """The LLM demo's tables plus each zoo's tuned table (module docstring); ``options`` are
    :func:`run_llm_demo`'s. The report folder and the validation data are checked before the long
    work; the report is written atomically."""
    given = demo_arguments(**options, log=log)
    target = report_destination(report, given["tasks"], given["base"], given["cache"], legacy=REPORT_FILES)
    splits = load_splits(given["tasks"])
    for split in splits:  # a task whose fine-tunes train on all of its training examples fails here, not after
        carve(split, settings.validation_size, trained_on=given["protocol"].train_size)
    demo = run_llm_demo(**{**given, "report": None})
    suite = prepare_suite(given["tasks"], given["base"], given["cache"], given["protocol"],
                          checked_device(given["device"]), silent, given["progress"])
    names = method_names(given["methods"], len(given["tasks"]))
    tuning: dict[str, TuneResult] = {}
    with report_folder(target) if target is not None else nullcontext() as folder:
        for kind, rows in demo.tables.items():
            zoo = build_llm_zoo(kind, suite.tasks, suite.base, folder_fingerprint(suite.base), given["protocol"],
                                suite.root, device=suite.device, progress=False, log=silent)
            out = folder / "tuning" / kind if folder is not None else None
            individual = next(r.scores for r in rows if r.label == "Individual")  # the table's normalization
            tuning[kind], tuned = tune_zoo(zoo, suite, splits, individual, given, names, settings, out,
                                           demo.timings, log)
            rows += tuned
        if folder is not None:
            write_llm_report(replace(demo, report=folder), given["protocol"], given["seed"], tuning)
    demo.report = target.path if target is not None else None
    return demo


def silent(message: str) -> None:
    """A log that drops its lines: the suite and the zoos, already logged by the demo."""


def tune_zoo(zoo: LLMZoo, suite: Suite, splits: Sequence, individual: Mapping[str, Score], given: Mapping,
             names: Sequence[str], settings: TuneSettings, out: Path | None, timings: dict[str, float],
             log: Callable[[str], None]) -> tuple[TuneResult, list[LLMRow]]:
    """Tune every method on the zoo's validation prompts, then score each best recipe on test (normalized
    by ``individual``, the fine-tunes' test scores): the tuning run and the zoo's tuned rows (timings
    ``<zoo>_tuning_seconds``, ``<zoo>_tuned_test_seconds``)."""
    protocol = given["protocol"]
    recipe = build_recipe({"base": str(suite.base), "models": [str(p) for p in zoo.paths], "seed": given["seed"]})
    started = time.perf_counter()
    log(f"{zoo.kind} zoo: tuning {len(names)} method(s) on validation prompts ...")
    validation = LLMSuite(recipe, splits, settings.validation_size, suite.root, protocol, suite.device,
                          trained_on=protocol.train_size, progress=suite.progress)
    zoo_settings = replace(settings, task_data=dict(zip(validation.labels, given["tasks"])))
    run = tune(recipe, validation, names, zoo_settings, out, log)
    rows = tested_rows([(run, None)], lambda result, label: tested_row(suite, result, label, individual),
                       timings, started, lambda message: log(f"{zoo.kind} zoo: {message}"), prefix=f"{zoo.kind}_")
    return run, rows


def tested_row(suite: Suite, result: MethodResult, label: str, individual: Mapping[str, Score]) -> LLMRow:
    """The tuned recipe merged from its file and scored on the test prompts, once (by the demo's
    content-addressed cache: a model bit-identical to one already scored is read back)."""
    start = time.perf_counter()
    merged = merge_recipe(result.recipe_path or result.recipe)
    merge_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores: dict[str, Score] = {}
    for state, tasks in scored_states(MergedModel.of(merged), suite.tasks):
        def load(state=state):
            return model_from_state(suite.base, state, f"the tuned {result.method} merge", suite.device)

        scores.update(suite.score(state_digest(state), load, tasks))
    return scored(label, scores, dict(individual), parameters=merged.parameters, merge_seconds=merge_seconds,
                  eval_seconds=time.perf_counter() - start)


def scored_states(model: MergedModel, tasks: Sequence[PromptTask]) -> list[tuple[dict, list[PromptTask]]]:
    """The tasks grouped by the weights each is scored with: one group for one merged body, one per
    task for a per-task merge (EMR's rebuilt states; the zoo's model labels are its task names)."""
    groups: dict[int, tuple[dict, list[PromptTask]]] = {}
    for task in tasks:
        state = model.state_for(task.name)
        groups.setdefault(id(state), (state, []))[1].append(task)
    return list(groups.values())
