"""primerge: streaming merges of fine-tuned checkpoints (PRIME, TSV, TIES, Task Arithmetic, ...).

Public API: :func:`merge`, :func:`merge_recipe`, :func:`dry_run` (``primerge plan``), :func:`ray_session`
(many Ray merges on warm workers), :func:`load_recipe`,
:func:`list_methods`, :func:`get_method`, :func:`load_task_state` (per-task methods),
:func:`load_task_model` (a task's head on the merged body), :class:`MergeResult`,
:class:`Recipe`, and the errors in :mod:`primerge.util.errors`. Everything but the errors is imported
on first use, so ``import primerge`` (and ``primerge --version``) does not load torch.
"""

from __future__ import annotations

from primerge.util.errors import InputError, OutputError, PrimergeError, RecipeError

from primerge.util.lazy import lazy_attributes
from primerge.version import __version__

#: public name -> the module that defines it
_LAZY = {
    "merge": "primerge.api",
    "merge_recipe": "primerge.api",
    "dry_run": "primerge.api",
    "ray_session": "primerge.api",
    "MergeResult": "primerge.output.base",
    "get_method": "primerge.methods",
    "list_methods": "primerge.methods",
    "load_task_state": "primerge.output.per_task",
    "load_task_model": "primerge.output.heads",
    "Recipe": "primerge.core.recipe",
    "load_recipe": "primerge.core.recipe",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = ["InputError", "OutputError", "PrimergeError", "RecipeError", "__version__", *_LAZY]
