"""Linear (mergekit ``linear``; Model Soups, Wortsman et al. 2022): the weighted mean of the models.

With the models' weights w_t and weights θ_t = θ₀ + τ_t,

    θ = Σ_t w_t θ_t / Σ_t w_t = θ₀ + Σ_t w_t τ_t / Σ_t w_t            (``normalize``, the default),
    θ = Σ_t w_t θ_t = θ₀ + (Σ_t w_t − 1) θ₀ + Σ_t w_t τ_t             (``normalize: false``).

The base is the reference the task vectors are taken from, not one of the averaged models: as in
mergekit, where ``base_model`` joins a linear merge only when it is also listed under ``models``,
it joins the mean here only when listed under ``models`` too (its τ is 0, so it adds its weight to
the denominator: θ₀ + Σ w_t τ_t / (w₀ + Σ w_t)). The merge reads the task vectors only through
Σ_t w_t τ_t, accumulated one model at a time.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from primerge.methods.base import MethodParams, TensorContext, merge_method, reads_sum
from primerge.methods.stack import TaskStack
from primerge.methods.task_arithmetic import WEIGHT_SUM_FLOOR, combined_sum
from primerge.util.errors import RecipeError


class LinearParams(MethodParams):
    normalize: bool = Field(True, description="divide by the sum of the models' weights (a weighted mean)")


@merge_method("linear", LinearParams, "Linear (mergekit): weighted mean of the models, Σ w_t θ_t / Σ w_t (the base "
              "joins only when listed under models)", family="elementwise", reads_base=True)
@reads_sum
def merge(taus: TaskStack, ctx: TensorContext, params: LinearParams) -> Tensor:
    """θ − θ₀ of the weighted mean (or sum) of one tensor's models."""
    total = taus.sum()
    if not params.normalize:
        return (sum(taus.weights) - 1.0) * ctx.base + total
    if abs(sum(taus.weights)) < WEIGHT_SUM_FLOOR:
        raise RecipeError(f"tensor '{ctx.name}': linear divides by the sum of the models' weights, which is 0; give "
                          "weights with a non-zero sum, or normalize: false.")
    return combined_sum(total, taus, "weights", 1.0)
