"""Task-vector purification plug-ins that any merge method can use (PAVE).

:func:`build_purifier` turns a recipe's ``purify:`` block into the engine's task-vector
transform (:data:`primerge.core.sources.TaskVectorTransform`).

Floors: above the plan and the engine (beside analysis), below the API; it reads task data through
:mod:`primerge.data.tasks` and models through :mod:`primerge.io.hf`, never through evaluation;
methods never import it.
"""

from primerge.core.purify_block import PurifyConfig, parse_purify
from primerge.purify.pave import Purifier, build_purifier, purified_task_vector, spectral_allocation

__all__ = ["PurifyConfig", "Purifier", "build_purifier", "parse_purify", "purified_task_vector",
           "spectral_allocation"]
