"""Merging methods: one module each, registered in :mod:`primerge.methods.base`.

Importing this package registers every built-in method.

Floors: above linalg, errors and validation, below the recipe, the plan and the engine: a method
never opens a file and never loops over parameter names.
"""

from primerge.methods import task_arithmetic, ties, tsv, prime, dare, della, breadcrumbs, consensus, iso, subspace_boosting, drm, emr, ho_gsvd, wudi, knots, core_space, linear, slerp, nuslerp, multislerp, karcher, model_stock, sce, nearswap, arcee_fusion, mergekit_names, regmean  # noqa: F401, I001  (registration order = listing order)
from primerge.methods.base import (
    MethodParams,
    MethodSpec,
    TensorContext,
    get_method,
    list_methods,
    merge_method,
    reads_sum,
)

__all__ = ["MethodParams", "MethodSpec", "TensorContext", "get_method", "list_methods", "merge_method", "reads_sum"]
