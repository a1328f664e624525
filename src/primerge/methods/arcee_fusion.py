"""Arcee Fusion (mergekit ``arcee_fusion``): keep only the fine-tune's outlying important changes.

For the base θ₀ and one model θ₁ = θ₀ + τ, per tensor:

1. importance s = |τ| · KL(p ‖ q) per entry, with p = softmax(θ₁) + 1e-8 and q = softmax(θ₀) +
   1e-8 along the last axis (one KL value per row; a 1-D tensor is one row);
2. threshold s* = median + 1.5·IQR of all importances, the quartiles read at sorted positions
   ⌊q (N − 1)⌋ for q = ¼, ½, ¾ (Tukey's fence);
3. θ = θ₀ + [s ≥ s*] ⊙ τ.

mergekit 0.1.5 estimates the quartiles of a tensor of more than 10⁶ entries from 10⁶ random draws
(so its result varies from run to run there); here they are always exact, from
:func:`torch.kthvalue`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from primerge.methods.base import MethodParams, TensorContext, merge_method
from primerge.methods.stack import TaskStack

#: Added to both softmax distributions before the KL divergence (mergekit's 1e-8).
PROBABILITY_FLOOR = 1e-8
#: Tukey's fence: median + FENCE · (Q3 − Q1).
FENCE = 1.5


def importance(theta0: Tensor, tau: Tensor) -> Tensor:
    """s = |τ| · KL(softmax(θ₀ + τ) ‖ softmax(θ₀)) with the KL per row of the last axis."""
    p = torch.softmax(theta0 + tau, dim=-1) + PROBABILITY_FLOOR
    q = torch.softmax(theta0, dim=-1) + PROBABILITY_FLOOR
    return tau.abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)


def tukey_threshold(scores: Tensor) -> Tensor:
    """median + 1.5 (Q3 − Q1), the order statistics at positions ⌊q (N − 1)⌋ (0-based)."""
    flat = scores.reshape(-1)
    last = flat.numel() - 1

    def order_statistic(position: int) -> Tensor:
        return flat.kthvalue(position + 1).values

    q1, median, q3 = (order_statistic(last * k // 4) for k in (1, 2, 3))
    return median + FENCE * (q3 - q1)


@merge_method("arcee_fusion", MethodParams, "Arcee Fusion (mergekit): keep the entries of one model's τ whose "
              "|τ|·KL(softmax) importance clears median + 1.5 IQR", family="elementwise", reads_base=True,
              models=(1, 1))
def merge(taus: TaskStack, ctx: TensorContext, params: MethodParams) -> Tensor:
    """[s ≥ s*] ⊙ τ for one tensor."""
    tau = taus.dense()[0]
    scores = importance(ctx.base, tau)
    return torch.where(scores >= tukey_threshold(scores), tau, torch.zeros_like(tau))
