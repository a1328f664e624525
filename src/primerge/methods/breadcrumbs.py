"""Model Breadcrumbs (Davari & Belilovsky 2024): per-row two-sided magnitude mask, then a sum.

For each task t and each row of τ_t (n entries, rows as in :func:`primerge.methods.della.as_rows`),
sort the entries by |value| descending; drop the top g = round(γ·n) (outliers) and keep the next
k = min(round(density·n), n − g); everything below is dropped too (ALGORITHMS.md, Classic
methods). The merged update is τ = α Σ_t m_t ⊙ τ_t.
Rounding is half-up; ties in |value| are broken by position (stable sort).

[decision] Defaults γ = 0.01 and density = 0.9 — drop the largest 1% of each row, keep the next
90%, drop the smallest 9%. The PRIME paper does not run Breadcrumbs and the Breadcrumbs paper
tunes both per task set; these are the values commonly used with the method's reference
implementation in merge toolkits, and keep the mask a mild, outlier-removing one.
[decision] α unset means 1/T, the PRIME paper's Task Arithmetic weighting (Table 2), so the
result is the masked counterpart of the default Task Arithmetic merge.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import Tensor

from primerge.methods.base import MethodParams, TensorContext, merge_method, scale_field, uniform_scale
from primerge.methods.della import as_rows, row_ranks
from primerge.methods.stack import TaskStack


class BreadcrumbsParams(MethodParams):
    gamma: float = Field(0.01, ge=0.0, le=1.0, description="γ: fraction of largest |values| dropped per row")
    density: float = Field(0.9, ge=0.0, le=1.0, description="fraction kept per row, after the top γ")
    scale: float | None = scale_field(None, "λ on the summed masked vectors; unset means 1/T (alias: alpha)")

    @model_validator(mode="after")
    def _fractions_fit(self) -> BreadcrumbsParams:
        if self.gamma + self.density > 1.0:
            raise ValueError(f"gamma + density must be at most 1, got {self.gamma} + {self.density}")
        return self


def _half_up(x: float) -> int:
    return math.floor(x + 0.5)


def breadcrumbs_mask(taus: Tensor, gamma: float, density: float) -> Tensor:
    """Boolean mask (T, *shape): per row, entries ranked g..g+k−1 by |value| descending."""
    rows = as_rows(taus)
    n = rows.shape[-1]
    top = _half_up(gamma * n)
    kept = min(_half_up(density * n), n - top)
    position = row_ranks(rows, descending=True)
    return ((position >= top) & (position < top + kept)).reshape(taus.shape)


@merge_method("breadcrumbs", BreadcrumbsParams,
              "Model Breadcrumbs: per row drop the top-γ outliers and the small tail, then sum", family="elementwise")
def merge(taus: TaskStack, ctx: TensorContext, params: BreadcrumbsParams) -> Tensor:
    """λ Σ_t m_t ⊙ τ_t with the Breadcrumbs masks m_t of one tensor."""
    dense = taus.dense()
    mask = breadcrumbs_mask(dense, params.gamma, params.density)
    zero = torch.zeros((), dtype=dense.dtype, device=dense.device)
    return uniform_scale(params.scale, taus.T) * torch.where(mask, dense, zero).sum(0)
