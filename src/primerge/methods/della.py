"""DELLA-Merging (Deep et al. 2024): magnitude-ranked stochastic drop (MagPrune), rescale,
sign election and disjoint mean.

Per task t and per row of the task vector (docs/algorithms.md, "della"):

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

mergekit's ``della`` and ``della_linear`` (:mod:`primerge.methods.mergekit_names`) differ in the
rescale and the combine, each a parameter here: ``rescale: l1`` scales each pruned δ̂_t to the L1
norm of δ_t instead of by 1/p_i per entry (``none``: no rescale); ``combine: linear`` sums the
pruned vectors without sign election; ``normalize`` divides by the agreeing models' weights
(``weights``, mergekit's ``normalize: true``) or not at all instead of the paper's rule (unset:
the count for ``ties``, no division for ``linear``). ``density`` and ``epsilon`` may be given per
model. The models' weights multiply the pruned δ̂_t (``weights: given``, mergekit's order): the
ranks are those of the unweighted δ_t.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from primerge.methods.base import (MethodParams, Normalize, PerTask, PerTaskFraction, TensorContext, along_tasks,
                                   merge_method, per_task, scale_field, task_pairs)
from primerge.methods.dare import uniform_draws
from primerge.methods.rescale import Rescale, l1_rescaled, normalize_field, rescale_field
from primerge.methods.stack import TaskStack
from primerge.methods.task_arithmetic import combined_sum
from primerge.methods.ties import disjoint_mean


class DellaParams(MethodParams):
    density: PerTaskFraction = Field(0.2, description="mean fraction of entries kept per row (one, or one per model)")
    epsilon: PerTask = Field(0.1, description="ε: keep probabilities span density ± ε (one, or one per model)")
    scale: float = scale_field(1.0, "λ applied to the merged update (alias: alpha)")
    combine: Literal["ties", "linear"] = Field("ties", description="sign election and disjoint mean (paper), or a "
                                               "plain sum (mergekit's della_linear)")
    rescale: Rescale = rescale_field("1/p_i")
    normalize: Normalize | None = normalize_field()

    @model_validator(mode="after")
    def _probabilities_in_range(self) -> DellaParams:
        for density, epsilon in task_pairs(self.density, self.epsilon):
            if density <= 0.0 or epsilon < 0.0 or epsilon > density or density + epsilon > 1.0:
                raise ValueError(f"keep probabilities density ± epsilon must lie in [0, 1] with density > 0; "
                                 f"got density {density} and epsilon {epsilon}")
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


def keep_probabilities(rows: Tensor, density: float | Tensor, epsilon: float | Tensor) -> Tensor:
    """p_i = (density − ε) + 2ε·rank_i/(n − 1) with ranks ascending by |δ| within each row
    (``density`` and ``epsilon`` one value each, or (T,) tensors of one per task).

    [decision] A row of a single entry has no spread of ranks: its normalised rank is 0.5, so
    it is kept with probability ``density``.
    """
    n = rows.shape[-1]
    if n == 1:
        normalised = torch.full_like(rows, 0.5)
    else:
        normalised = row_ranks(rows).to(rows.dtype) / (n - 1)
    if isinstance(density, Tensor):
        density = along_tasks(density, rows)
    if isinstance(epsilon, Tensor):
        epsilon = along_tasks(epsilon, rows)
    return (density - epsilon) + 2.0 * epsilon * normalised


def magprune(taus: Tensor, density: float | Tensor, epsilon: float | Tensor, seed: int,
             rescale: Rescale = "keep_probability") -> Tensor:
    """MagPrune: keep each entry with probability p_i and rescale survivors by 1/p_i (or as
    ``rescale`` says, :data:`primerge.methods.dare.Rescale`)."""
    rows = as_rows(taus)
    p = keep_probabilities(rows, density, epsilon)
    keep = uniform_draws(rows.shape, seed, rows.dtype, rows.device) < p
    zero = torch.zeros((), dtype=rows.dtype, device=rows.device)
    if rescale == "keep_probability":
        return torch.where(keep, rows / torch.where(keep, p, torch.ones_like(p)), zero).reshape(taus.shape)
    kept = torch.where(keep, rows, zero).reshape(taus.shape)
    return l1_rescaled(kept, taus) if rescale == "l1" else kept


@merge_method("della", DellaParams, "DELLA: magnitude-ranked random drop per row, rescale 1/p, elect signs, "
              "disjoint mean (mergekit's variant: rescale: l1, normalize: weights|none)", family="elementwise",
              weights="given")
def merge(taus: TaskStack, ctx: TensorContext, params: DellaParams) -> Tensor:
    """λ · disjoint-mean(sign-elected MagPrune(τ_t)) for one tensor (docs/algorithms.md, "della")."""
    density, epsilon = per_task(params.density, taus, "density"), per_task(params.epsilon, taus, "epsilon")
    pruned = magprune(taus.dense(), density, epsilon, ctx.seed, params.rescale)
    weights = taus.weight_vector()
    if params.combine == "linear":
        total = (pruned * along_tasks(weights, pruned)).sum(0)
        return combined_sum(total, taus, params.normalize or "none", params.scale)
    return disjoint_mean(pruned, params.scale, params.normalize or "count", weights)
