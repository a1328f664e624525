"""The offline benchmark: tasks, the fine-tuned zoo, evaluation, the linear probe and the demo.

Floors: above the API (it uses only primerge's public API, ``primerge.merge``,
``primerge.list_methods``), below the CLI; task data come from :mod:`primerge.data.tasks`. Entry points: :func:`build_zoo`, :func:`evaluate_model`,
:func:`run_demo`; the CLI subcommands ``zoo build``, ``eval`` and ``demo`` live in
:mod:`primerge.cli.evaluate`.
"""

from primerge.util.lazy import lazy_attributes

_LAZY = {
    **dict.fromkeys(["DemoResult", "Row", "run_demo"], "primerge.evaluation.demo"),
    **dict.fromkeys(["DEFAULT_TASKS", "TaskData", "TaskSplit", "load_splits", "load_table", "load_task"],
                    "primerge.data.tasks"),
    **dict.fromkeys(["TrainingProtocol", "Zoo", "ZooEntry", "build_zoo", "evaluate_model"], "primerge.evaluation.zoo"),
}
__getattr__ = lazy_attributes(__name__, _LAZY)
__all__ = sorted(_LAZY)
