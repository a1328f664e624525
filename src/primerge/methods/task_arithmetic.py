"""Task Arithmetic (Ilharco et al. 2023): τ = λ Σ_t τ_t, with λ = 1/T by default.

The default λ = 1/T is the PRIME paper's Table 2 setting (uniform weighting). The merge depends
on the task vectors only through their sum, so the stream accumulates Σ_t τ_t one model at a time.
"""

from __future__ import annotations

from torch import Tensor

from primerge.methods.base import MethodParams, TensorContext, merge_method, reads_sum, scale_field, uniform_scale
from primerge.methods.stack import TaskStack


class TaskArithmeticParams(MethodParams):
    scale: float | None = scale_field(None, "λ; unset means 1/T (alias: alpha)")


@merge_method("task_arithmetic", TaskArithmeticParams, "Scaled sum of task vectors, λ Σ τ_t (λ = 1/T by default)",
              family="elementwise")
@reads_sum
def merge(taus: TaskStack, ctx: TensorContext, params: TaskArithmeticParams) -> Tensor:
    """λ Σ_t τ_t (Task Arithmetic, Ilharco et al. 2023, Eq. 1)."""
    return uniform_scale(params.scale, taus.T) * taus.sum()
