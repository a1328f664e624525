"""SCE (FuseChat, Wan et al. 2024, arXiv 2408.07990): Select, Calculate, Erase — per tensor.

1. Select: keep the entries whose variance across the task vectors, Var_t(τ_t) (population
   variance), is among the top ⌊``select_topk`` · N'⌋ of the N' entries with non-zero variance;
   the rest are zeroed in every τ_t (``select_topk`` ≥ 1 keeps everything, ≤ 0 nothing).
2. Calculate: task coefficients η_t = ‖τ_t‖² / Σ_s ‖τ_s‖² over the selected entries (mergekit
   uses the means of the squares: the same ratio); uniform 1/T when Σ_s mean(τ_s²) ≤
   ``weight_floor``.
3. Erase: elect γ = sign(Σ_t τ_t) per entry and drop the entries of τ_t whose sign differs,
   m_t = [sign(τ_t) = γ].

τ = Σ_t η_t m_t τ_t / max(Σ_t η_t m_t, 1e-6). mergekit's ``sce`` (0.1.5) is this with
``weight_floor: 1e-6`` (with task vectors of order 1e-3, as LLM fine-tunes have, that floor makes
the coefficients uniform; the paper has none, so the default is 0). mergekit elects + where
Σ_t τ_t is exactly 0; there every τ_t is 0 after selection or the entries cancel exactly, and the
two rules differ only in the second, measure-zero, case.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from primerge.methods.base import Fraction, MethodParams, TensorContext, merge_method
from primerge.methods.stack import TaskStack

#: Σ_t η_t m_t is floored here before dividing (mergekit's 1e-6).
COEFFICIENT_FLOOR = 1e-6


class SceParams(MethodParams):
    select_topk: Fraction = Field(1.0, description="fraction of entries kept by variance across the task vectors")
    weight_floor: float = Field(0.0, ge=0.0, description="Σ_t mean(τ_t²) at or below which the coefficients are "
                                "uniform; mergekit uses 1e-6")


def variance_selection(taus: Tensor, fraction: float) -> Tensor:
    """Boolean mask (*shape): the top ⌊fraction · N'⌋ entries by variance across tasks, N' the
    number of entries with non-zero variance (step 1)."""
    if fraction >= 1.0:
        return torch.ones(taus.shape[1:], dtype=torch.bool, device=taus.device)
    variance = taus.var(0, unbiased=False).reshape(-1)
    kept = int(int(torch.count_nonzero(variance)) * fraction) if fraction > 0.0 else 0
    mask = torch.zeros_like(variance, dtype=torch.bool)
    mask[variance.topk(kept).indices] = True
    return mask.reshape(taus.shape[1:])


def task_coefficients(taus: Tensor, floor: float) -> Tensor:
    """η_t = mean(τ_t²) / Σ_s mean(τ_s²), uniform when the sum is at most ``floor`` (step 2)."""
    energy = taus.square().reshape(taus.shape[0], -1).mean(1)
    total = energy.sum()
    if float(total) <= floor:
        return torch.full_like(energy, 1.0 / taus.shape[0])
    return energy / total


def sce_update(taus: Tensor, select_topk: float, weight_floor: float) -> Tensor:
    """Σ_t η_t m_t τ_t / max(Σ_t η_t m_t, 1e-6) after the variance selection (module docstring)."""
    selected = torch.where(variance_selection(taus, select_topk), taus, 0.0)
    eta = task_coefficients(selected, weight_floor).reshape(-1, *(1,) * (taus.dim() - 1))
    agree = torch.sign(selected) == torch.sign(selected.sum(0))
    kept = torch.where(agree, eta, 0.0)
    return (kept * selected).sum(0) / kept.sum(0).clamp(min=COEFFICIENT_FLOOR)


@merge_method("sce", SceParams, "SCE (FuseChat): select entries by variance across tasks, weight tasks by their "
              "squared norms, erase minority signs", family="elementwise")
def merge(taus: TaskStack, ctx: TensorContext, params: SceParams) -> Tensor:
    """The SCE update of one tensor."""
    return sce_update(taus.dense(), params.select_topk, params.weight_floor)
