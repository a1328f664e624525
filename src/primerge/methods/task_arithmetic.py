"""Task Arithmetic (Ilharco et al. 2023): τ = λ Σ_t τ_t, with λ = 1/T by default.

The default λ = 1/T is the PRIME paper's Table 2 setting (uniform weighting). The merge depends
on the task vectors only through their sum, so the stream accumulates Σ_t τ_t one model at a time.

``normalize`` divides the sum of the (weighted) task vectors Σ_t w_t τ_t by the models' weights
Σ_t w_t (``weights``, mergekit's ``normalize: true``) or by T (``count``); λ unset is then 1.
:func:`combined_sum` is the rule every summing method shares (DARE, DELLA and Breadcrumbs with a
linear combine, ``linear``).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from primerge.methods.base import (MethodParams, Normalize, TensorContext, merge_method, reads_sum, scale_field,
                                   uniform_scale)
from primerge.methods.stack import TaskStack

#: |Σ_t w_t| below this is not divided by (mergekit's guard against a vanishing weight sum).
WEIGHT_SUM_FLOOR = 1e-8


class TaskArithmeticParams(MethodParams):
    scale: float | None = scale_field(None, "λ; unset means 1/T, or 1 when normalize is set (alias: alpha)")
    normalize: Normalize = Field("none", description="divide Σ w_t τ_t by nothing (paper), T (count) or "
                                 "Σ w_t (weights: mergekit normalize: true)")


def combined_sum(total: Tensor, taus: TaskStack, normalize: Normalize, scale: float | None) -> Tensor:
    """λ · total / D for ``total`` = Σ_t w_t τ_t (or its sparsified counterpart): D = 1 (``none``),
    T (``count``) or Σ_t w_t (``weights``; 1 when |Σ_t w_t| < 1e-8). λ unset: 1/T with ``none``
    (uniform weighting), 1 otherwise."""
    if normalize == "none":
        return uniform_scale(scale, taus.T) * total
    divisor = float(taus.T) if normalize == "count" else sum(taus.weights)
    if abs(divisor) < WEIGHT_SUM_FLOOR:
        divisor = 1.0
    return (1.0 if scale is None else scale) * total / divisor


@merge_method("task_arithmetic", TaskArithmeticParams,
              "Scaled sum of task vectors, λ Σ τ_t (λ = 1/T by default; normalize: weights is mergekit's)",
              family="elementwise")
@reads_sum
def merge(taus: TaskStack, ctx: TensorContext, params: TaskArithmeticParams) -> Tensor:
    """λ Σ_t τ_t (Task Arithmetic, Ilharco et al. 2023, Eq. 1), divided as ``normalize`` says."""
    return combined_sum(taus.sum(), taus, params.normalize, params.scale)
