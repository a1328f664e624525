"""Merging methods: one module each, registered in :mod:`primerge.methods.base`.

Importing this package registers every built-in method.
"""

from primerge.methods import task_arithmetic, ties, tsv, prime, dare, della, breadcrumbs, consensus, iso, subspace_boosting, drm, emr, ho_gsvd  # noqa: F401, I001  (registration order = listing order)
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
