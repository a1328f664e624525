"""Helpers shared by the method tests."""

from __future__ import annotations

import torch

from primerge.methods import get_method
from primerge.methods.base import TensorContext

MATRIX = TensorContext("layer.weight", "matrix", seed=3)


def run(method: str, taus: torch.Tensor, ctx: TensorContext = MATRIX, **params) -> torch.Tensor:
    """One method's merged update of ``taus`` with validated ``params``."""
    spec = get_method(method)
    return spec.apply(taus, ctx, spec.parameters(params))


def random_taus(T: int, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Task vectors with a shared rank-1 part, a rank-2 part per task and noise (float64)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    shared = torch.randn(m, 1, generator=g, dtype=f64) @ torch.randn(1, n, generator=g, dtype=f64)
    out = []
    for _ in range(T):
        own = torch.randn(m, 2, generator=g, dtype=f64) @ torch.randn(2, n, generator=g, dtype=f64)
        out.append(shared + own + 0.1 * torch.randn(m, n, generator=g, dtype=f64))
    return torch.stack(out)
