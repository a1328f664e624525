"""Consensus Merging with TALL masks (Wang et al. 2024, "Localizing Task Information").

With τ_MTL = Σ_t τ_t (the multi-task vector):

1. TALL mask of task t: m_t = [ |τ_t| ≥ λ_t · |τ_MTL − τ_t| ]
   — the entries where task t matters at least λ_t times as much as all the others together.
2. Consensus: keep the entries selected by at least k masks, Σ_t m_t ≥ k (k = 2 removes
   "selfish" weights used by one task only and "catastrophic" ones used by none).
3. τ = α · mask ⊙ τ_MTL.

This is the TALL-mask consensus, not TIES's sign consensus (docs/algorithms.md, "consensus").

[decision] λ_t = 0.4 for every task: the paper selects λ_t per task on validation data from
{0.2, …, 0.6}; with no data the middle of that range is the neutral choice. A list gives one
λ_t per task (in the recipe's model order). [decision] α unset means 1/T: the Consensus paper
applies its mask on top of Task Arithmetic, and the PRIME paper weights TA uniformly (Table 2).
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import Tensor

from primerge.util.errors import RecipeError
from primerge.methods.base import MethodParams, TensorContext, merge_method, scale_field, uniform_scale
from primerge.methods.stack import TaskStack


class ConsensusParams(MethodParams):
    k: int = Field(2, ge=1, description="minimum number of TALL masks an entry needs to be kept")
    lam: float | list[float] = Field(0.4, description="λ_t of the TALL masks: one value or one per task")
    scale: float | None = scale_field(None, "λ on the masked τ_MTL; unset means 1/T (alias: alpha)")

    @field_validator("lam")
    @classmethod
    def _non_negative(cls, value: float | list[float]) -> float | list[float]:
        values = value if isinstance(value, list) else [value]
        if not values or any(v < 0 for v in values):
            raise ValueError("lam must be a non-negative number or a non-empty list of them")
        return value


def tall_masks(taus: Tensor, lam: float | list[float], name: str = "") -> Tensor:
    """m_t = |τ_t| ≥ λ_t |τ_MTL − τ_t| for every task, shape (T, *shape), boolean."""
    T = taus.shape[0]
    if isinstance(lam, list):
        if len(lam) != T:
            raise RecipeError(
                f"consensus: 'lam' lists {len(lam)} values but tensor '{name}' has {T} task vectors"
            )
        lam_t = torch.tensor(lam, dtype=taus.dtype, device=taus.device)
    else:
        lam_t = torch.full((T,), lam, dtype=taus.dtype, device=taus.device)
    lam_t = lam_t.reshape((T,) + (1,) * (taus.dim() - 1))
    total = taus.sum(0)
    return taus.abs() >= lam_t * (total - taus).abs()


@merge_method("consensus", ConsensusParams,
              "Consensus (TALL masks): keep entries important to at least k tasks, of the task sum",
              family="elementwise")
def merge(taus: TaskStack, ctx: TensorContext, params: ConsensusParams) -> Tensor:
    """λ · [Σ_t m_t ≥ k] ⊙ Σ_t τ_t for one tensor."""
    dense = taus.dense()
    votes = tall_masks(dense, params.lam, ctx.name).sum(0)
    total = dense.sum(0)
    zero = torch.zeros((), dtype=dense.dtype, device=dense.device)
    return uniform_scale(params.scale, taus.T) * torch.where(votes >= params.k, total, zero)
