"""Task Arithmetic (Ilharco et al. 2023): τ = λ Σ_t τ_t, with λ = 1/T by default.

The default λ = 1/T is the PRIME paper's Table 2 setting (uniform weighting).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from primerge.methods.base import MethodParams, MethodSpec, TensorContext, register


class TaskArithmeticParams(MethodParams):
    scale: float | None = Field(None, description="λ; None means 1/T")


def of_sum(total: Tensor, tasks: int, ctx: TensorContext, params: TaskArithmeticParams) -> Tensor:
    """λ Σ_t τ_t (Task Arithmetic, Ilharco et al. 2023, Eq. 1) from the sum Σ_t τ_t."""
    return (params.scale if params.scale is not None else 1.0 / tasks) * total


def merge(taus: Tensor, ctx: TensorContext, params: TaskArithmeticParams) -> Tensor:
    """λ Σ_t τ_t from the stacked task vectors (the engine streams the sum via :func:`of_sum`)."""
    return of_sum(taus.sum(0), taus.shape[0], ctx, params)


SPEC = register(
    MethodSpec(
        name="task_arithmetic",
        description="Scaled sum of task vectors, λ Σ τ_t (λ = 1/T by default)",
        params_model=TaskArithmeticParams,
        merge=merge,
        family="elementwise",
        sum_merge=of_sum,
    )
)
