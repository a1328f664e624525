"""primerge: streaming merges of fine-tuned checkpoints (PRIME, TSV, TIES, Task Arithmetic, ...).

Public API: :func:`merge`, :func:`merge_recipe`, :func:`load_recipe`,
:func:`list_methods`, :func:`get_method`, :func:`load_task_state` (per-task methods), and the errors in :mod:`primerge.errors`.
"""

__version__ = "0.1.0"

from primerge.api import merge, merge_recipe  # noqa: E402
from primerge.output.base import MergeResult  # noqa: E402
from primerge.errors import InputError, OutputError, PrimergeError, RecipeError  # noqa: E402
from primerge.methods import get_method, list_methods  # noqa: E402
from primerge.output.per_task import load_task_state  # noqa: E402
from primerge.recipe import Recipe, load_recipe  # noqa: E402

__all__ = [
    "InputError",
    "MergeResult",
    "OutputError",
    "PrimergeError",
    "Recipe",
    "RecipeError",
    "__version__",
    "get_method",
    "list_methods",
    "load_task_state",
    "load_recipe",
    "merge",
    "merge_recipe",
]
