"""Evaluation through lm-evaluation-harness, offline.

primerge writes each cast task (:class:`~primerge.evaluation.llm.prompts.PromptTask`) as a local
lm-eval task: a JSONL file of ``{"prompt", "label"}`` test rows and a YAML config (multiple choice
over the label words, ``acc`` = argmax over classes of the summed log-likelihood of the answer's
tokens), then runs the harness's Python API (``lm_eval.simple_evaluate``) with its ``HFLM`` model
on a loaded causal LM. Nothing goes to the Hugging Face hub: the data files are local JSON read by
the ``datasets`` JSON builder with ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` set before
``datasets`` is imported, and tasks are indexed from primerge's folders only, unless the user names
one of lm-eval's own tasks (which then must be available locally).

The task files live under ``<cache>/llm/tasks/<name>-<fingerprint>/`` (and the datasets' Arrow
cache under ``<cache>/llm/datasets``), so ``lm_eval --include_path`` can rerun them by hand.

The harness runs through its public ``lm_eval.evaluate`` on the tasks a ``TaskManager`` loads,
with what ``simple_evaluate`` would set on them (zero-shot unless a task says otherwise, lm-eval's
few-shot seed) and without what it adds around them: the run's environment record, which runs
``git describe`` in the working folder (printing ``fatal: not a git repository`` outside one)
and collects torch's environment report (about 2 s per call, on every tuning trial). Each task's
score carries n and lm-eval's standard error (:mod:`primerge.evaluation.llm.estimates`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from primerge.util.errors import InputError
from primerge.evaluation.llm.estimates import Score
from primerge.evaluation.llm.prompts import TARGET_DELIMITER, PromptTask

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_EVALUATE_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
TASK_PREFIX = "primerge_"
METRIC = "acc,none"
STDERR = "acc_stderr,none"
#: lm-eval computes standard errors only when this is positive; ``acc``'s is closed-form (no resampling),
#: the count matters only for the resampled metrics of a user's own tasks, which primerge does not report.
STDERR_ITERATIONS = 100
#: lm-eval's default seed of the few-shot sampler (``simple_evaluate``'s ``fewshot_random_seed``).
FEWSHOT_SEED = 1234


def go_offline() -> None:
    """Forbid hub access for the datasets/transformers/evaluate libraries: through the environment for
    libraries not imported yet, and through ``datasets.config`` if it was imported already."""
    os.environ.update(OFFLINE)
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_DATASETS_OFFLINE = config.HF_HUB_OFFLINE = True


def lm_eval_module():
    go_offline()
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (fails early if transformers is missing)
    except ImportError as exc:
        raise InputError("evaluating with lm-evaluation-harness needs the llm extra: pip install 'primerge[llm]'") from exc
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return lm_eval


def harness_name(task: str) -> str:
    """The lm-eval task name of a primerge task (prefixed so it cannot shadow an lm-eval task)."""
    return TASK_PREFIX + task


def task_config(task: PromptTask, data_file: Path, datasets_cache: Path) -> dict:
    """The lm-eval YAML config of a cast task: zero-shot multiple choice over its label words."""
    return {
        "task": harness_name(task.name),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(datasets_cache)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{label}}",
        "doc_to_choice": list(task.words),
        "target_delimiter": TARGET_DELIMITER,
        "num_fewshot": 0,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1, "primerge_fingerprint": task.fingerprint()},
    }


def write_task(task: PromptTask, root: Path) -> Path:
    """Write (or reuse) the task's JSONL test data and YAML config; returns their folder."""
    import yaml

    folder = root / "llm" / "tasks" / f"{task.name}-{task.fingerprint()[:16]}"
    config_file = folder / f"{harness_name(task.name)}.yaml"
    if config_file.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / f"{task.name}.test.jsonl"
    rows = (json.dumps({"prompt": p, "label": y}) for p, y in zip(task.test_prompts, task.test_labels))
    data_file.write_text("\n".join(rows) + "\n")
    config = task_config(task, data_file, root / "llm" / "datasets")
    tmp = config_file.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    tmp.replace(config_file)
    return folder


def task_manager(include: Sequence[Path], defaults: bool):
    """An lm-eval TaskManager over primerge's task folders (+ lm-eval's own tasks if ``defaults``)."""
    from lm_eval.tasks import TaskManager

    lm_eval_module()
    return TaskManager(include_path=[str(p) for p in include] or None, include_defaults=defaults)


def named_task_manager(include: Sequence[Path], names: Sequence[str]):
    """A TaskManager that knows every name in ``names``: the ``include`` folders alone when they hold
    them all (fast), else with lm-eval's own tasks indexed too. Unknown names raise InputError."""
    if include:
        manager = task_manager(include, defaults=False)
        if set(names) <= set(manager.all_tasks):
            return manager
    manager = task_manager(include, defaults=True)
    check_task_names(manager, names)
    return manager


def check_task_names(manager, names: Sequence[str]) -> None:
    from primerge.util.errors import closest

    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            raise InputError(
                f"lm-eval has no task '{name}' here.{closest(name, known)} Give a packaged task, a .csv/.jsonl "
                "file, an lm-eval task available offline, or a folder of task YAMLs with --include-path.")


def run_harness(model, tokenizer, names: Sequence[str], manager, batch_size: int = 32,
                log_samples: bool = False, progress: bool = True) -> dict:
    """``lm_eval.evaluate`` on an in-memory causal LM (HFLM) and the named tasks (module docstring);
    returns lm-eval's result dict. Without ``progress`` nothing lm-eval writes to stderr is shown
    (its progress bars: building each task's requests has no switch for its own)."""
    lm_eval = lm_eval_module()
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    silenced = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    try:
        with silenced:
            loaded = manager.load(list(names))
            for task in loaded["tasks"].values():
                if task.get_config("num_fewshot") is None:
                    task.set_config(key="num_fewshot", value=0)
                task.set_fewshot_seed(seed=FEWSHOT_SEED)
            return lm_eval.evaluate(lm=lm, task_dict=loaded, bootstrap_iters=STDERR_ITERATIONS,
                                    log_samples=log_samples, verbosity="ERROR")
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as exc:
        raise InputError(f"lm-eval could not run tasks {list(names)} offline ({exc}).") from exc


def scores(results: dict, names: Sequence[str]) -> dict[str, Score]:
    """``acc``, its standard error and n of every task in ``names`` from an lm-eval result dict (a
    task without ``acc`` is an error)."""
    found = {}
    for name in names:
        metrics = results["results"].get(name, {})
        if METRIC not in metrics:
            raise InputError(f"lm-eval task '{name}' reports no 'acc' metric (it has {sorted(metrics)}); "
                             "primerge tabulates multiple-choice accuracy only.")
        stderr = metrics.get(STDERR)
        found[name] = Score(float(metrics[METRIC]), int(results["n-samples"][name]["effective"]),
                            float(stderr) if isinstance(stderr, (int, float)) else None)
    return found


def evaluate_prompt_tasks(model, tokenizer, tasks: Sequence[PromptTask], root: Path,
                          batch_size: int = 32, progress: bool = True) -> dict[str, Score]:
    """Accuracy, n and standard error of an in-memory causal LM on cast tasks, by primerge task name
    (lm-eval's progress bars only with ``progress``)."""
    folders = [write_task(t, root) for t in tasks]
    names = [harness_name(t.name) for t in tasks]
    results = run_harness(model, tokenizer, names, task_manager(folders, defaults=False), batch_size=batch_size,
                          progress=progress)
    found = scores(results, names)
    return {t.name: found[harness_name(t.name)] for t in tasks}
