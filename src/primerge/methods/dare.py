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
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from primerge.methods.base import MethodParams, TensorContext, merge_method, scale_field, uniform_scale
from primerge.methods.stack import TaskStack
from primerge.methods.ties import tensor_thresholds, ties_merge


class DareParams(MethodParams):
    drop_rate: float = Field(0.8, ge=0.0, lt=1.0, description="p: probability of dropping an entry")
    combine: Literal["linear", "ties"] = Field("linear", description="merge of the rescaled vectors")
    scale: float | None = scale_field(None, "λ; unset: 1/T for linear, 1.0 for ties (alias: alpha)")
    ties_density: float = Field(
        1.0, ge=0.0, le=1.0, description="combine: ties — magnitude fraction kept after the drop"
    )


def uniform_draws(shape: torch.Size, seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """U[0, 1) draws from a CPU ``torch.Generator`` seeded with ``seed`` (bit-for-bit reproducible,
    independent of the order tensors are merged in, since ``seed`` comes from the tensor name)."""
    draw_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=draw_dtype).to(device=device, dtype=dtype)


def drop_and_rescale(taus: Tensor, drop_rate: float, seed: int) -> Tensor:
    """δ̂ = m ⊙ δ / (1 − p), m_i = [u_i ≥ p] with u ~ U[0, 1) seeded by ``seed`` (P(m_i = 1) = 1 − p)."""
    keep = uniform_draws(taus.shape, seed, taus.dtype, taus.device) >= drop_rate
    zero = torch.zeros((), dtype=taus.dtype, device=taus.device)
    return torch.where(keep, taus / (1.0 - drop_rate), zero)


@merge_method("dare", DareParams, "DARE: random drop with rate p, rescale by 1/(1-p), then Task Arithmetic or TIES",
              family="elementwise")
def merge(taus: TaskStack, ctx: TensorContext, params: DareParams) -> Tensor:
    """DARE then TA (λ Σ_t δ̂_t) or TIES on the rescaled task vectors of one tensor."""
    dropped = drop_and_rescale(taus.dense(), params.drop_rate, ctx.seed)
    if params.combine == "linear":
        return uniform_scale(params.scale, taus.T) * dropped.sum(0)
    scale = params.scale if params.scale is not None else 1.0
    return ties_merge(dropped, tensor_thresholds(dropped, params.ties_density), scale)
