"""Model Breadcrumbs (Davari & Belilovsky 2024): per-row two-sided magnitude mask, then a sum.

For each task t and each row of τ_t (n entries, rows as in :func:`primerge.methods.della.as_rows`),
sort the entries by |value| descending; drop the top g = round(γ·n) (outliers) and keep the next
k = min(round(density·n), n − g); everything below is dropped too (docs/algorithms.md,
"breadcrumbs"). The merged update is τ = α Σ_t m_t ⊙ τ_t.
Rounding is half-up; ties in |value| are broken by position (stable sort).

[decision] Defaults γ = 0.01 and density = 0.9 — drop the largest 1% of each row, keep the next
90%, drop the smallest 9%. The PRIME paper does not run Breadcrumbs and the Breadcrumbs paper
tunes both per task set; these are the values commonly used with the method's reference
implementation in merge toolkits, and keep the mask a mild, outlier-removing one.
[decision] α unset means 1/T, the PRIME paper's Task Arithmetic weighting (Table 2), so the
result is the masked counterpart of the default Task Arithmetic merge.

mergekit's ``breadcrumbs`` and ``breadcrumbs_ties`` (:mod:`primerge.methods.mergekit_names`)
rank the whole tensor, count with floors, sum without scaling and offer sign election; each is a
parameter here (paper's rule by default): ``scope: tensor`` ranks all entries of τ_t at once;
``rounding: floor`` keeps k = ⌊density·N⌋ below the top g = min(⌊γ·N⌋, N − k) (all of them for
density ≥ 1), mergekit's counts; ``combine: ties`` elects signs and takes the disjoint mean of the
masked vectors, divided as ``normalize`` says; ``rescale: l1`` rescales each masked τ_t to τ_t's L1
norm. ``gamma`` and ``density`` may be given per model. The models' weights multiply the masked
τ_t (``weights: given``, mergekit's order): the ranks are those of the unweighted τ_t.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from primerge.methods.base import (MethodParams, Normalize, PerTaskFraction, TensorContext, along_tasks, merge_method,
                                   scale_field, task_pairs, task_values)
from primerge.methods.della import as_rows, row_ranks
from primerge.methods.rescale import l1_rescaled
from primerge.methods.stack import TaskStack
from primerge.methods.task_arithmetic import combined_sum
from primerge.methods.ties import Rounding, disjoint_mean


class BreadcrumbsParams(MethodParams):
    gamma: PerTaskFraction = Field(0.01, description="γ: fraction of largest |values| dropped per row (one, or one "
                                   "per model)")
    density: PerTaskFraction = Field(0.9, description="fraction kept per row, after the top γ (one, or one per model)")
    scale: float | None = scale_field(None, "λ on the combined masked vectors; unset: 1/T for linear, 1.0 for ties "
                                      "(alias: alpha)")
    scope: Literal["row", "tensor"] = Field("row", description="rank |values| within each row (paper) or over the "
                                            "whole tensor (mergekit)")
    rounding: Rounding = Field("nearest", description="counts rounded half-up (paper) or floored, top cut first "
                               "shrunk to fit (mergekit)")
    combine: Literal["linear", "ties"] = Field("linear", description="sum the masked vectors (paper), or elect signs "
                                               "and take the disjoint mean (mergekit's breadcrumbs_ties)")
    normalize: Normalize | None = Field(None, description="unset: the combine's own (linear: none, ties: count); "
                                        "weights: divide by the models' weights (mergekit normalize: true)")
    rescale: Literal["none", "l1"] = Field("none", description="none (paper), or l1: masked τ_t rescaled to τ_t's "
                                           "L1 norm (mergekit rescale: true)")

    @model_validator(mode="after")
    def _fractions_fit(self) -> BreadcrumbsParams:
        for gamma, density in task_pairs(self.gamma, self.density):
            if self.rounding == "nearest" and gamma + density > 1.0:
                raise ValueError(f"gamma + density must be at most 1, got {gamma} + {density}")
        return self


def _half_up(x: float) -> int:
    return math.floor(x + 0.5)


def band(gamma: float, density: float, n: int, rounding: Rounding = "nearest") -> tuple[int, int]:
    """(g, k): drop the top g of n entries and keep the next k. ``nearest``: g = round(γ·n),
    k = min(round(density·n), n − g), half-up; ``floor`` (mergekit): k = ⌊density·n⌋ (n for
    density ≥ 1, then g = 0) and g = min(⌊γ·n⌋, n − k)."""
    if rounding == "nearest":
        top = _half_up(gamma * n)
        return top, min(_half_up(density * n), n - top)
    if density >= 1.0:
        return 0, n
    kept = math.floor(density * n)
    return min(math.floor(gamma * n), n - kept), kept


def breadcrumbs_mask(taus: Tensor, gamma: float | list[float], density: float | list[float],
                     scope: Literal["row", "tensor"] = "row", rounding: Rounding = "nearest") -> Tensor:
    """Boolean mask (T, *shape): per row (``scope: tensor``: over the whole tensor), the entries
    ranked g_t..g_t+k_t−1 by |value| descending, (g_t, k_t) = :func:`band` of task t's γ and density.

    Equal magnitudes are ordered by position (``nearest``), or with ``floor`` as mergekit orders
    them: each row sorted ascending by ``torch.sort``, positions n − g − k .. n − g − 1 kept.
    """
    rows = as_rows(taus) if scope == "row" else taus.reshape(taus.shape[0], 1, -1)
    n, T = rows.shape[-1], rows.shape[0]
    gammas = gamma if isinstance(gamma, list) else [gamma] * T
    densities = density if isinstance(density, list) else [density] * T
    bands = [band(g, d, n, rounding) for g, d in zip(gammas, densities)]
    if rounding == "floor":
        mask = torch.zeros_like(rows, dtype=torch.bool)
        for t, (top, kept) in enumerate(bands):
            ascending = torch.sort(rows[t].abs(), dim=-1).indices[:, n - top - kept:n - top]
            mask[t].scatter_(-1, ascending, True)
        return mask.reshape(taus.shape)
    top = torch.tensor([b[0] for b in bands], device=taus.device).reshape(T, 1, 1)
    kept = torch.tensor([b[1] for b in bands], device=taus.device).reshape(T, 1, 1)
    position = row_ranks(rows, descending=True)
    return ((position >= top) & (position < top + kept)).reshape(taus.shape)


@merge_method("breadcrumbs", BreadcrumbsParams,
              "Model Breadcrumbs: per row drop the top-γ outliers and the small tail, then sum "
              "(mergekit's variant: scope: tensor, rounding: floor)", family="elementwise", weights="given")
def merge(taus: TaskStack, ctx: TensorContext, params: BreadcrumbsParams) -> Tensor:
    """λ Σ_t m_t ⊙ τ_t with the Breadcrumbs masks m_t of one tensor (or their disjoint mean)."""
    dense = taus.dense()
    gamma = task_values(params.gamma, taus.T, "gamma")
    density = task_values(params.density, taus.T, "density")
    mask = breadcrumbs_mask(dense, gamma, density, params.scope, params.rounding)
    masked = torch.where(mask, dense, torch.zeros((), dtype=dense.dtype, device=dense.device))
    if params.rescale == "l1":
        masked = l1_rescaled(masked, dense)
    weights = taus.weight_vector()
    if params.combine == "linear":
        total = (masked * along_tasks(weights, masked)).sum(0)
        return combined_sum(total, taus, params.normalize or "none", params.scale)
    scale = params.scale if params.scale is not None else 1.0
    return disjoint_mean(masked, scale, params.normalize or "count", weights)
