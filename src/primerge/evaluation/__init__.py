"""The offline benchmark: tasks, the fine-tuned zoo, evaluation, the linear probe and the demo.

It sits above the engine and uses only primerge's public API (``primerge.merge``,
``primerge.list_methods``). Entry points: :func:`build_zoo`, :func:`evaluate_model`,
:func:`run_demo`; the CLI subcommands ``zoo build``, ``eval`` and ``demo`` live in
:mod:`primerge.evaluation.cli`.
"""

from primerge.evaluation.demo import DemoResult, Row, run_demo
from primerge.evaluation.tasks import DEFAULT_TASKS, TaskData, TaskSplit, load_splits, load_table, load_task
from primerge.evaluation.zoo import Protocol, Zoo, ZooEntry, build_zoo, cache_root, evaluate_model

__all__ = [
    "DEFAULT_TASKS",
    "DemoResult",
    "Row",
    "Protocol",
    "TaskData",
    "TaskSplit",
    "Zoo",
    "ZooEntry",
    "build_zoo",
    "cache_root",
    "evaluate_model",
    "load_splits",
    "load_table",
    "load_task",
    "run_demo",
]
