"""Multi-SLERP (mergekit): barycentric interpolation of T models on the hypersphere, per tensor.

The vectors v_t are the task vectors τ_t (``space: task_vectors``, about θ₀: mergekit with a
``base_model``) or the weights θ_t (``space: weights``: mergekit without one), each tensor one
vector. With barycentric weights w_t (the models' weights, divided by Σ_t w_t unless
``normalize_weights`` is false) and u_t = v_t / (‖v_t‖ + ε):

1. mean direction m = Σ_t w_t u_t / ‖Σ_t w_t u_t‖ (the tangent point);
2. tangent vectors g_t = u_t − (u_t·m) m, combined: g = Σ_t w_t g_t;
3. back to the sphere by the exponential map: u = cos‖g‖ m + sin‖g‖ g/‖g‖ (‖g‖ + ε in both);
4. the result is (Σ_t w_t ‖v_t‖) u.

A single model is returned as it is; when Σ_t w_t u_t vanishes (antipodal directions whose
weights cancel), two models take their linear combination w₁ v₁ + w₂ v₂ and more are refused.
The weights are barycentric coordinates here, not multipliers of τ (``weights: given``).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from primerge.methods.base import MethodParams, TensorContext, merge_method
from primerge.methods.sphere import Space, as_update, points
from primerge.methods.stack import TaskStack
from primerge.util.errors import RecipeError


class MultislerpParams(MethodParams):
    normalize_weights: bool = Field(True, description="divide the models' weights by their sum")
    eps: float = Field(1e-8, gt=0.0, description="ε added to norms before dividing by them")
    space: Space = Field("task_vectors", description="interpolate τ_t about θ₀, or the weights θ_t about 0")


def barycentric_weights(taus: TaskStack, normalize: bool, ctx: TensorContext) -> Tensor:
    """The models' weights as a (T,) tensor, divided by their sum when ``normalize``."""
    weights = taus.weight_vector()
    if not normalize:
        return weights
    if float(weights.sum()) == 0.0:
        raise RecipeError(f"tensor '{ctx.name}': multislerp divides the models' weights by their sum, which is 0; "
                          "give weights with a non-zero sum, or normalize_weights: false.")
    return weights / weights.sum()


def multislerp(vectors: Tensor, weights: Tensor, eps: float, ctx: TensorContext) -> Tensor:
    """The Multi-SLERP of ``vectors`` (T, N) with barycentric ``weights`` (T,) (module docstring)."""
    norms = torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
    units = vectors / (norms + eps)
    w = weights.reshape(-1, 1)
    mean = (units * w).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if vectors.shape[0] == 2:
            return (vectors * w).sum(0)
        raise RecipeError(f"tensor '{ctx.name}': the weighted mean of the models' directions vanishes (antipodal "
                          "models whose weights cancel), so multislerp has no tangent point; change the weights.")
    mean = mean / mean_norm
    tangent = ((units - (units @ mean).unsqueeze(1) * mean) * w).sum(0)
    tangent_norm = torch.linalg.vector_norm(tangent) + eps
    direction = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    return direction * (norms.squeeze(1) * weights).sum()


@merge_method("multislerp", MultislerpParams, "Multi-SLERP (mergekit): barycentric interpolation of T models' task "
              "vectors (or weights) on the hypersphere, weighted by the models' weights", family="elementwise",
              reads_base=True, weights="given")
def merge(taus: TaskStack, ctx: TensorContext, params: MultislerpParams) -> Tensor:
    """θ − θ₀ of the Multi-SLERP of one tensor's models."""
    dense = taus.dense()
    if taus.T == 1:
        return dense[0]
    vectors = points(dense, ctx, params.space).reshape(taus.T, -1)
    weights = barycentric_weights(taus, params.normalize_weights, ctx)
    result = multislerp(vectors, weights, params.eps, ctx)
    return as_update(result.reshape(dense.shape[1:]), ctx, params.space)
