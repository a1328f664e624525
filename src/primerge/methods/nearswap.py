"""NearSwap (mergekit ``nearswap``): take the fine-tune's value where it is close to the base's.

Per entry, with the distance |τ| = |θ₁ − θ₀| floored at 1e-6,

    w = clamp(t / |τ|, 0, 1),    θ = w θ₁ + (1 − w) θ₀ = θ₀ + w τ,

so entries that moved by at most t are swapped in whole, and entries that moved further are
pulled towards the base in proportion t/|τ|. Defined for the base and one model (the method's
reference: the QuartetAnemoi-70B-t0.0001 model card, whose name gives the default t).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from primerge.methods.base import MethodParams, TensorContext, merge_method
from primerge.methods.stack import TaskStack

#: |τ| is floored here before dividing (mergekit's 1e-6).
DISTANCE_FLOOR = 1e-6


class NearswapParams(MethodParams):
    t: float = Field(1e-4, ge=0.0, description="distance |θ1 − θ0| up to which an entry is swapped in whole")


def nearswap_update(tau: Tensor, t: float) -> Tensor:
    """w τ with w = clamp(t / max(|τ|, 1e-6), 0, 1)."""
    return (t / tau.abs().clamp(min=DISTANCE_FLOOR)).clamp(0.0, 1.0) * tau


@merge_method("nearswap", NearswapParams, "NearSwap (mergekit): per entry, θ0 + clamp(t/|τ|, 0, 1)·τ — close "
              "entries of one model swapped in, far ones damped", family="elementwise", models=(1, 1))
def merge(taus: TaskStack, ctx: TensorContext, params: NearswapParams) -> Tensor:
    """The NearSwap update of one tensor."""
    return nearswap_update(taus.dense()[0], params.t)
