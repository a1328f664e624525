"""SLERP: spherical interpolation between the base θ₀ and one fine-tune θ₁, tensor by tensor.

Each tensor is one vector (all its entries). With cos Ω = θ̂₀·θ̂₁ (a norm below 1e-8 counts as 1,
so a zero tensor is not divided by zero),

    θ = sin((1 − t)Ω)/sin Ω · θ₀ + sin(tΩ)/sin Ω · θ₁        (Shoemake 1985),

and, as mergekit does, the linear interpolation (1 − t) θ₀ + t θ₁ where |cos Ω| > 0.9995 (nearly
parallel or antiparallel tensors, where sin Ω vanishes). t = 0 gives the base, t = 1 the model.
With θ₁ = θ₀ + τ the update is written θ − θ₀ = (c₀ + c₁ − 1) θ₀ + c₁ τ, so no cancellation
of two large tensors loses τ's digits (exactly t·τ on the linear branch).

mergekit's ``slerp`` (0.1.5) computes the same per tensor; ``t`` per tensor class or depth is the
recipe's business (a per-tensor value reaches this function as one float). The model's weight
multiplies τ before the interpolation, as for every method (``weights: applied``).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from primerge.methods.base import MethodParams, TensorContext, merge_method
from primerge.methods.sphere import slerp_coefficients
from primerge.methods.stack import TaskStack

#: |cos Ω| above this takes the linear interpolation (mergekit's threshold).
DOT_THRESHOLD = 0.9995
#: Norms at or below this are taken as 1 (mergekit's eps).
NORM_FLOOR = 1e-8


class SlerpParams(MethodParams):
    t: float = Field(0.5, description="interpolation factor: 0 gives the base, 1 the model")


def unit(x: Tensor) -> Tensor:
    """x / ‖x‖, or x itself when ‖x‖ ≤ 1e-8."""
    norm = torch.linalg.vector_norm(x)
    return x / torch.where(norm > NORM_FLOOR, norm, torch.ones_like(norm))


def slerp_update(theta0: Tensor, tau: Tensor, t: float) -> Tensor:
    """θ − θ₀ for θ = slerp(t; θ₀, θ₀ + τ) over the whole tensor (module docstring)."""
    a = theta0.reshape(-1)
    cos = torch.dot(unit(a), unit(a + tau.reshape(-1))).clamp(-1.0, 1.0)
    c0, c1 = slerp_coefficients(cos, t, cos.abs() > DOT_THRESHOLD)
    return (c0 + c1 - 1) * theta0 + c1 * tau


@merge_method("slerp", SlerpParams, "SLERP (mergekit): spherical interpolation of the base and one model by t, "
              "per tensor; linear where nearly parallel", family="elementwise", reads_base=True, models=(1, 1))
def merge(taus: TaskStack, ctx: TensorContext, params: SlerpParams) -> Tensor:
    """θ − θ₀ of slerp(t; θ₀, θ₀ + τ₁) for one tensor."""
    return slerp_update(ctx.base, taus.dense()[0], params.t)
