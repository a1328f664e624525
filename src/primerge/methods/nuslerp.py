"""NuSLERP (mergekit): SLERP of two models with the factor taken from their weights, row by row
or over the whole tensor.

With the two models' weights w₁, w₂ the factor is t = w₂ / (w₁ + w₂) (½ when |w₁ + w₂| < 1e-6),
and the two vectors v₁, v₂ — the task vectors τ_t (``space: task_vectors``: interpolated about
θ₀, mergekit with a ``base_model``) or the weights θ_t (``space: weights``: about the origin,
mergekit without one) — are interpolated as

    slerp(t; v₁, v₂) = sin((1 − t)Ω)/sin Ω · v₁ + sin(tΩ)/sin Ω · v₂,   cos Ω = v̂₁·v̂₂,

with the norms floored at 1e-7 and the linear interpolation (1 − t) v₁ + t v₂ where
1 − cos²Ω ≤ 1e-16 (parallel or antiparallel). The vectors are the whole tensor (``flatten``,
the default), else its rows along the last axis, or along the first with ``row_wise`` (mergekit's
``nuslerp_flatten`` / ``nuslerp_row_wise``, accepted as aliases). The result is the linear
combination c₁ v₁ + c₂ v₂, so the update is c₁ τ₁ + c₂ τ₂, plus (c₁ + c₂ − 1) θ₀ for
``weights``.
The weights are interpolation factors here, not multipliers of τ (``weights: given``).
"""

from __future__ import annotations

import torch
from pydantic import AliasChoices, Field
from torch import Tensor

from primerge.methods.base import MethodParams, TensorContext, merge_method
from primerge.methods.sphere import Space, slerp_coefficients
from primerge.methods.stack import TaskStack

#: Norms are floored here before normalising (mergekit's 1e-7).
NORM_FLOOR = 1e-7
#: 1 − cos²Ω at or below this square takes the linear interpolation (mergekit's eps = 1e-8).
PARALLEL_EPS = 1e-8
#: |w₁ + w₂| below this gives t = ½.
WEIGHT_SUM_FLOOR = 1e-6


class NuslerpParams(MethodParams):
    flatten: bool = Field(True, validation_alias=AliasChoices("flatten", "nuslerp_flatten"),
                          description="one vector per tensor (alias: nuslerp_flatten)")
    row_wise: bool = Field(False, validation_alias=AliasChoices("row_wise", "nuslerp_row_wise"),
                           description="without flatten: vectors along the first axis, not the last "
                           "(alias: nuslerp_row_wise)")
    space: Space = Field("task_vectors", description="interpolate τ_t about θ₀, or the weights θ_t about 0")


def interpolation_factor(weights: tuple[float, ...]) -> float:
    """t = w₂ / (w₁ + w₂), or ½ when the weights cancel."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < WEIGHT_SUM_FLOOR else weights[1] / total


def vectors_last(x: Tensor, params: NuslerpParams) -> Tensor:
    """``x`` arranged with its vectors along the last axis (one vector when flattened)."""
    if params.flatten or x.dim() == 0:
        return x.reshape(-1)
    return x.transpose(0, -1) if params.row_wise else x


def restore(y: Tensor, like: Tensor, params: NuslerpParams) -> Tensor:
    """The inverse of :func:`vectors_last` for a tensor shaped like ``like``."""
    if params.flatten or like.dim() == 0:
        return y.reshape(like.shape)
    return y.transpose(0, -1) if params.row_wise else y


def unit_rows(v: Tensor) -> Tensor:
    """v / max(‖v‖, 1e-7) along the last axis."""
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)


def nuslerp_update(taus: Tensor, ctx: TensorContext, t: float, params: NuslerpParams) -> Tensor:
    """θ − θ₀ of the NuSLERP of the two vectors of ``taus`` (2, *shape) (module docstring)."""
    tau1, tau2 = (vectors_last(x, params) for x in taus)
    if params.space == "weights":
        base = vectors_last(ctx.base, params)
        v1, v2 = tau1 + base, tau2 + base
    else:
        v1, v2 = tau1, tau2
    cos = (unit_rows(v1) * unit_rows(v2)).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    c1, c2 = slerp_coefficients(cos, t, (1 - cos.square()) <= PARALLEL_EPS**2)
    update = c1 * tau1 + c2 * tau2
    if params.space == "weights":
        update = update + (c1 + c2 - 1) * base
    return restore(update, taus[0], params)


@merge_method("nuslerp", NuslerpParams, "NuSLERP (mergekit): SLERP of two models' task vectors (or weights) with "
              "t = w2/(w1+w2), per tensor or per row", family="elementwise", reads_base=True, weights="given",
              models=(2, 2))
def merge(taus: TaskStack, ctx: TensorContext, params: NuslerpParams) -> Tensor:
    """θ − θ₀ of NuSLERP of the two models of one tensor."""
    return nuslerp_update(taus.dense(), ctx, interpolation_factor(taus.weights), params)
