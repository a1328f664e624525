"""Karcher mean (mergekit ``karcher``): the Riemannian mean of the models' directions on the
hypersphere, rescaled by their mean norm, per tensor.

Each tensor of each model is one vector v_t: its weights θ_t (``space: weights``, the default, as
mergekit does) or its task vector τ_t (``space: task_vectors``, about θ₀). With u_t = v_t/‖v_t‖
and barycentric weights α_t = w_t / Σ_s w_s (the models' weights; mergekit's are uniform, 1/T,
which equal weights give), the Karcher mean minimises Σ_t α_t d(u, u_t)² over unit vectors u,
d the great-circle distance (Karcher 1977; the fixed-point iteration of Buss & Fillmore 2001):

    g = Σ_t α'_t · Ω_t / sin Ω_t · (u_t − cos Ω_t · u),   cos Ω_t = u·u_t,
    u ← cos‖g‖ · u + sin‖g‖ · g/‖g‖,   then u ← u/‖u‖,

over the vectors with ‖v_t‖ > ``tol`` (α' their α renormalised; a term with Ω_t < ``tol`` adds
nothing), from u = the normalised Σ α'_t u_t (u_1 when that is shorter than ``tol``), stopping
when ‖g‖ < ``tol`` or after ``max_iter`` steps. The result is (Σ_t α_t ‖v_t‖) u; with no vector
longer than ``tol`` it is 0. The weights are barycentric here, not multipliers of τ
(``weights: given``); they must be non-negative with a positive sum.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from primerge.methods.base import MethodParams, TensorContext, merge_method
from primerge.methods.sphere import Space, as_update, points
from primerge.methods.stack import TaskStack
from primerge.util.errors import RecipeError


class KarcherParams(MethodParams):
    max_iter: int = Field(10, ge=0, description="most fixed-point steps")
    tol: float = Field(1e-5, gt=0.0, description="stop when the tangent step is shorter; norms and angles below it "
                       "count as 0")
    space: Space = Field("weights", description="average the weights θ_t (mergekit), or τ_t about θ₀")


def karcher_weights(taus: TaskStack, ctx: TensorContext) -> list[float]:
    """α_t = w_t / Σ_s w_s; a :class:`RecipeError` for negative weights or a zero sum."""
    if any(w < 0 for w in taus.weights) or sum(taus.weights) <= 0:
        raise RecipeError(f"tensor '{ctx.name}': karcher takes the models' weights as barycentric weights, which "
                          f"must be non-negative with a positive sum; got {list(taus.weights)}.")
    total = sum(taus.weights)
    return [w / total for w in taus.weights]


def tangent_step(mean: Tensor, units: list[Tensor], alphas: list[float], tol: float) -> Tensor:
    """g = Σ_t α_t Ω_t / sin Ω_t (u_t − cos Ω_t u): the weighted log maps of the u_t at u."""
    step = torch.zeros_like(mean)
    for alpha, unit in zip(alphas, units):
        cos = torch.dot(mean, unit).clamp(-1.0, 1.0)
        omega = torch.arccos(cos)
        if omega.item() >= tol:
            step += alpha * (omega / torch.sin(omega)) * (unit - cos * mean)
    return step


def karcher_mean(vectors: Tensor, alphas: list[float], max_iter: int, tol: float) -> Tensor:
    """The rescaled Karcher mean of the rows of ``vectors`` (T, N) (module docstring)."""
    norms = torch.linalg.vector_norm(vectors, dim=1)
    valid = [t for t in range(vectors.shape[0]) if norms[t].item() > tol]
    if not valid:
        return torch.zeros_like(vectors[0])
    units = [vectors[t] / norms[t] for t in valid]
    total = sum(alphas[t] for t in valid)
    weights = [alphas[t] / total for t in valid]
    mean = sum(w * u for w, u in zip(weights, units))
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        step = tangent_step(mean, units, weights, tol)
        step_norm = torch.linalg.vector_norm(step)
        if step_norm.item() < tol:
            break
        mean = torch.cos(step_norm) * mean + torch.sin(step_norm) * (step / step_norm)
        length = torch.linalg.vector_norm(mean)
        if length.item() > tol:
            mean = mean / length
    return (torch.tensor(alphas, dtype=norms.dtype, device=norms.device) * norms).sum() * mean


@merge_method("karcher", KarcherParams, "Karcher mean (mergekit): Riemannian mean of the models' directions on "
              "the hypersphere, scaled by their mean norm", family="elementwise", reads_base=True, weights="given")
def merge(taus: TaskStack, ctx: TensorContext, params: KarcherParams) -> Tensor:
    """θ − θ₀ of the Karcher mean of one tensor's models."""
    dense = taus.dense()
    if taus.T == 1:
        return dense[0]
    vectors = points(dense, ctx, params.space).reshape(taus.T, -1)
    result = karcher_mean(vectors, karcher_weights(taus, ctx), params.max_iter, params.tol)
    return as_update(result.reshape(dense.shape[1:]), ctx, params.space)
