"""DELLA-Merging (Deep et al. 2024): magnitude-ranked stochastic drop (MagPrune), rescale,
sign election and disjoint mean.

Per task t and per row of the task vector (ALGORITHMS.md, Classic methods, DELLA):

1. Rank |δ| ascending within the row and normalise the rank to [0, 1]:
   r_i = rank_i / (n − 1) for a row of n entries.
2. Keep probability p_i = (density − ε) + 2ε·r_i, so the row keeps ``density`` of its
   entries on average, small magnitudes with probability density − ε and the largest with
   density + ε (DELLA's MagPrune).
3. Keep δ_i with probability p_i (Bernoulli draw seeded from ``ctx.seed``) and rescale the
   survivors by 1/p_i, so E[kept] = δ.
4. Sign election γ = sign(Σ_t δ̂_t), disjoint mean of the entries agreeing with γ, times λ
   (``scale``) — the TIES steps, reusing :func:`primerge.methods.ties.ties_merge`.

A "row" is the last axis of a matrix, all trailing axes of a higher-order tensor
(``(shape[0], −1)``, one output unit per row), and the whole tensor when it is 1-D or a scalar.

Defaults: density 0.2 (PRIME paper, Table 2: 80% pruned, as for TIES and DARE), λ = 1.0 (as
TIES). [decision] ε = 0.1: the PRIME paper gives none; half the density keeps every keep
probability inside [0.1, 0.3] (never 0, so every entry can survive and the 1/p_i rescale stays
bounded by 10) while still favouring large magnitudes threefold over small ones.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor

from primerge.methods.base import MethodParams, TensorContext, merge_method, scale_field
from primerge.methods.dare import uniform_draws
from primerge.methods.stack import TaskStack
from primerge.methods.ties import disjoint_mean


class DellaParams(MethodParams):
    density: float = Field(0.2, gt=0.0, le=1.0, description="mean fraction of entries kept per row")
    epsilon: float = Field(0.1, ge=0.0, description="ε: keep probabilities span density ± ε")
    scale: float = scale_field(1.0, "λ applied to the merged update (alias: alpha)")

    @model_validator(mode="after")
    def _probabilities_in_range(self) -> DellaParams:
        if self.epsilon > self.density or self.density + self.epsilon > 1.0:
            raise ValueError(
                f"keep probabilities density ± epsilon must lie in [0, 1]; got density "
                f"{self.density} and epsilon {self.epsilon}"
            )
        return self


def as_rows(taus: Tensor) -> Tensor:
    """View (T, *shape) task vectors as (T, rows, n): a row per leading index for tensors of
    order ≥ 2 (trailing axes flattened), one row holding everything for 1-D tensors and scalars."""
    if taus.dim() <= 2:
        return taus.reshape(taus.shape[0], 1, -1)
    return taus.reshape(taus.shape[0], taus.shape[1], -1)


def row_ranks(x: Tensor, descending: bool = False) -> Tensor:
    """Position of every entry of each row when the row is sorted by |x| (0-based, int64).

    Ascending by default (0 = smallest magnitude); ties are broken by index (stable sort).
    """
    order = x.abs().argsort(dim=-1, descending=descending, stable=True)
    positions = torch.arange(x.shape[-1], device=x.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def keep_probabilities(rows: Tensor, density: float, epsilon: float) -> Tensor:
    """p_i = (density − ε) + 2ε·rank_i/(n − 1) with ranks ascending by |δ| within each row.

    [decision] A row of a single entry has no spread of ranks: its normalised rank is 0.5, so
    it is kept with probability ``density``.
    """
    n = rows.shape[-1]
    if n == 1:
        normalised = torch.full_like(rows, 0.5)
    else:
        normalised = row_ranks(rows).to(rows.dtype) / (n - 1)
    return (density - epsilon) + 2.0 * epsilon * normalised


def magprune(taus: Tensor, density: float, epsilon: float, seed: int) -> Tensor:
    """MagPrune: keep each entry with probability p_i and rescale survivors by 1/p_i."""
    rows = as_rows(taus)
    p = keep_probabilities(rows, density, epsilon)
    keep = uniform_draws(rows.shape, seed, rows.dtype, rows.device) < p
    zero = torch.zeros((), dtype=rows.dtype, device=rows.device)
    return torch.where(keep, rows / torch.where(keep, p, torch.ones_like(p)), zero).reshape(taus.shape)


@merge_method("della", DellaParams, "DELLA: magnitude-ranked random drop per row, rescale 1/p, elect signs, "
              "disjoint mean", family="elementwise")
def merge(taus: TaskStack, ctx: TensorContext, params: DellaParams) -> Tensor:
    """λ · disjoint-mean(sign-elected MagPrune(τ_t)) for one tensor (ALGORITHMS.md, DELLA)."""
    return disjoint_mean(magprune(taus.dense(), params.density, params.epsilon, ctx.seed), params.scale)
