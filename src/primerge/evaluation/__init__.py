"""The offline benchmark: tasks, the fine-tuned zoo, evaluation, the linear probe and the demo.

Floors: above the API (it uses only primerge's public API, ``primerge.merge``,
``primerge.list_methods``), below the CLI; task data come from :mod:`primerge.datasets`. Entry points: :func:`build_zoo`, :func:`evaluate_model`,
:func:`run_demo`; the CLI subcommands ``zoo build``, ``eval`` and ``demo`` live in
:mod:`primerge.evaluation.cli`.
"""

from primerge.evaluation.demo import DemoResult, Row, run_demo
from primerge.datasets import DEFAULT_TASKS, TaskData, TaskSplit, load_splits, load_table, load_task
from primerge.evaluation.zoo import Protocol, Zoo, ZooEntry, build_zoo, evaluate_model

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
    "evaluate_model",
    "load_splits",
    "load_table",
    "load_task",
    "run_demo",
]
