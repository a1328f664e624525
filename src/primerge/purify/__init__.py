"""Task-vector purification plug-ins that any merge method can use (PAVE).

:func:`build_purifier` turns a recipe's ``purify:`` block into the engine's task-vector
transform (:data:`primerge.taskvectors.TaskVectorTransform`). This package sits above the engine;
methods never import it.
"""

from primerge.purify.config import PurifyConfig, parse_purify
from primerge.purify.pave import Purifier, build_purifier, purified_task_vector, spectral_allocation

__all__ = ["PurifyConfig", "Purifier", "build_purifier", "parse_purify", "purified_task_vector",
           "spectral_allocation"]
