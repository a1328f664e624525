"""The top-r singular triplets every SVD method asks for: ``SVD_r(X)`` with ``svd: auto | exact |
randomized`` (ALGORITHMS.md Conventions)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from primerge.linalg.choice import choose_svd
from primerge.linalg.core import SVD, svd
from primerge.linalg.krylov import TOLERANCE, block_krylov_svd

SVDMode = Literal["auto", "exact", "randomized"]


def exact_top(x: Tensor, rank: int) -> SVD:
    """The first ``rank`` triplets of the exact thin SVD."""
    full = svd(x)
    return SVD(full.U[..., :rank], full.S[..., :rank], full.V[..., :rank])


def truncated_svd(x: Tensor, rank: int, *, mode: SVDMode = "auto", seed: int = 0,
                  tol: float = TOLERANCE) -> SVD:
    """Top-``rank`` singular triplets ``SVD_r(X)`` of a matrix or a batch of matrices.

    ``exact`` slices LAPACK's full thin SVD. ``randomized`` is the seeded block Krylov SVD
    (:func:`primerge.linalg.krylov.block_krylov_svd`), kept as it comes out. ``auto`` takes the
    exact SVD or, where the cost model prefers it (:func:`primerge.linalg.choice.choose_svd`), the
    block Krylov SVD with its residual check at ``tol`` and the exact SVD for every matrix that
    fails it; on CPU the result is bit-for-bit reproducible for a given ``seed``.
    """
    r_full = min(x.shape[-2:])
    if not 1 <= rank <= r_full:
        raise ValueError(f"rank must be in [1, {r_full}] for shape {tuple(x.shape)}, got {rank}")
    if mode not in ("auto", "exact", "randomized"):
        raise ValueError(f"unknown SVD mode {mode!r}; use auto, exact or randomized")
    if mode == "exact" or (mode == "auto" and choose_svd(tuple(x.shape), rank).mode == "exact"):
        return exact_top(x, rank)
    found = block_krylov_svd(x, rank, seed=seed, tol=tol)
    if mode == "randomized" or bool(found.converged.all()):
        return found.factors
    return _exact_where(x, rank, found.factors, ~found.converged)


def _exact_where(x: Tensor, rank: int, factors: SVD, redo: Tensor) -> SVD:
    """``factors`` with the members selected by ``redo`` replaced by their exact top-``rank`` SVD."""
    if x.dim() == 2:
        return exact_top(x, rank)
    batch = x.shape[:-2]
    flat = [t.reshape(-1, *t.shape[len(batch):]).clone() for t in factors]
    index = torch.nonzero(redo.reshape(-1)).squeeze(-1)
    exact = exact_top(x.reshape(-1, *x.shape[-2:])[index], rank)
    for part, value in zip(flat, exact):
        part[index] = value
    return SVD(*(t.reshape(*batch, *t.shape[1:]) for t in flat))
