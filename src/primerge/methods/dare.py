"""DARE, Drop And REscale (Yu et al. 2024), followed by Task Arithmetic or TIES.

1. Drop: for every task and entry draw m ~ Bernoulli(1 − p) (seeded from ``ctx.seed``) and
   keep δ̂ = m ⊙ δ / (1 − p); the rescale keeps the expectation, E[δ̂] = δ.
2. Combine (``combine``):
   - ``linear``: Task Arithmetic on the rescaled vectors, τ = λ Σ_t δ̂_t;
   - ``ties``: TIES on them — trim to the top ``ties_density`` magnitudes per task, elect
     γ = sign(Σ_t δ̂_t), disjoint mean, times λ (:func:`primerge.methods.ties.ties_merge`).

Defaults: p = 0.8 (PRIME paper, Table 2: 80% dropped). [decision] ``combine: linear`` with
λ = 1/T: the PRIME comparison lists DARE beside uniform Task Arithmetic and its scores track
TA's (Tables 1 and 3), and with λ = 1/T the expectation of the merge equals TA's exactly.
[decision] ``scale`` left unset means 1/T for ``linear`` and 1.0 for ``ties`` (the two base
methods' own defaults). [decision] ``ties_density`` = 1.0: in DARE-TIES the random drop
replaces TIES's magnitude trim (DRM paper Section 5.1), so by default nothing more is trimmed;
the dropped entries are zeros and take no part in the disjoint mean.

mergekit's ``dare_ties`` / ``dare_linear`` (registered under those names in
:mod:`primerge.methods.mergekit_names`) differ in the rescale and the normalisation, each a
parameter here: ``rescale: l1`` scales each dropped δ̂_t to the L1 norm of δ_t instead of by
1/(1 − p) (``none``: no rescale); ``normalize`` divides the combined sum by the agreeing models'
weights (``weights``) or not at all (``none``) instead of the paper's rule (unset: the disjoint
mean's count for ``ties``, no division for ``linear``). ``drop_rate`` may be given per model.
The models' weights multiply the rescaled δ̂_t (``weights: given``, mergekit's order).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from primerge.methods.base import (MethodParams, Normalize, PerTaskFraction, TensorContext, along_tasks,
                                   merge_method, scale_field, task_values)
from primerge.methods.rescale import Rescale, l1_rescaled, normalize_field, rescale_field
from primerge.methods.stack import TaskStack
from primerge.methods.task_arithmetic import combined_sum
from primerge.methods.ties import tensor_thresholds, ties_merge



class DareParams(MethodParams):
    drop_rate: PerTaskFraction = Field(0.8, description="p: probability of dropping an entry (one, or one per model)")
    combine: Literal["linear", "ties"] = Field("linear", description="merge of the rescaled vectors")
    scale: float | None = scale_field(None, "λ; unset: 1/T for linear, 1.0 for ties (alias: alpha)")
    ties_density: float = Field(
        1.0, ge=0.0, le=1.0, description="combine: ties — magnitude fraction kept after the drop"
    )
    rescale: Rescale = rescale_field("1/(1-p)")
    normalize: Normalize | None = normalize_field()

    @model_validator(mode="after")
    def _keep_probability_positive(self) -> DareParams:
        rates = self.drop_rate if isinstance(self.drop_rate, list) else [self.drop_rate]
        if self.rescale == "keep_probability" and any(p >= 1.0 for p in rates):
            raise ValueError("drop_rate 1 drops everything and leaves nothing to rescale by 1/(1 - p); "
                             "use a drop_rate below 1, or rescale: l1 or none")
        return self


def uniform_draws(shape: torch.Size, seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """U[0, 1) draws from a CPU ``torch.Generator`` seeded with ``seed`` (bit-for-bit reproducible,
    independent of the order tensors are merged in, since ``seed`` comes from the tensor name)."""
    draw_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=draw_dtype).to(device=device, dtype=dtype)


def drop_and_rescale(taus: Tensor, drop_rate: float | Tensor, seed: int, rescale: Rescale = "keep_probability"
                     ) -> Tensor:
    """δ̂ = m ⊙ δ / (1 − p), m_i = [u_i ≥ p] with u ~ U[0, 1) seeded by ``seed`` (P(m_i = 1) = 1 − p);
    ``drop_rate`` one p or a (T,) tensor of one per task; ``rescale`` as :data:`Rescale`."""
    p = drop_rate if not isinstance(drop_rate, Tensor) else along_tasks(drop_rate, taus)
    # compared in the stack's dtype, as a Python float threshold is: one p per task = the same p for all
    keep = uniform_draws(taus.shape, seed, taus.dtype, taus.device) >= (p.to(taus.dtype) if isinstance(p, Tensor) else p)
    zero = torch.zeros((), dtype=taus.dtype, device=taus.device)
    if rescale == "keep_probability":
        # 1 − p in float64, then rounded once to the stack's dtype (as a Python float divisor is)
        survive = 1.0 - p if not isinstance(p, Tensor) else (1.0 - p.double()).to(taus.dtype)
        return torch.where(keep, taus / survive, zero)
    kept = torch.where(keep, taus, zero)
    return l1_rescaled(kept, taus) if rescale == "l1" else kept


@merge_method("dare", DareParams, "DARE: random drop with rate p, rescale by 1/(1-p), then Task Arithmetic or TIES "
              "(mergekit's variant: rescale: l1, normalize: weights|none)", family="elementwise", weights="given")
def merge(taus: TaskStack, ctx: TensorContext, params: DareParams) -> Tensor:
    """DARE then TA (λ Σ_t δ̂_t) or TIES on the rescaled task vectors of one tensor."""
    rates = (params.drop_rate if isinstance(params.drop_rate, float)
             else torch.tensor(task_values(params.drop_rate, taus.T, "drop_rate"), dtype=torch.float64,
                               device=taus.device))
    dropped = drop_and_rescale(taus.dense(), rates, ctx.seed, params.rescale)
    weights = taus.weight_vector()
    if params.combine == "linear":
        total = (dropped * along_tasks(weights, dropped)).sum(0)
        return combined_sum(total, taus, params.normalize or "none", params.scale)
    scale = params.scale if params.scale is not None else 1.0
    return ties_merge(dropped, tensor_thresholds(dropped, params.ties_density), scale, params.normalize or "count",
                      weights)
