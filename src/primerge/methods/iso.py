"""Iso-C and Iso-CTS: isotropic merging (Marczak et al. 2025, "No Task Left Behind").

**Iso-C**: M = Σ_t τ_t = U S Vᵀ; replace every singular value by their mean,
τ = α · mean(S) · U Vᵀ — a flat spectrum whose energy per direction is the average of the sum's.

**Iso-CTS**, per matrix with r_full = min(m, n) and common ratio c (0.8):
k_c = ⌊c·r_full⌋, t_tot = round((r_full − k_c)/T)·T, k_c = r_full − t_tot, n = t_tot/T
(the task-specific budget split evenly over the T tasks; ``round`` is Python's, half to even).

1. Common subspace: top-k_c triplets (U_c, S_c, V_c) of Σ_t τ_t.
2. Task-specific: w_t = τ_t − U_c U_cᵀ τ_t (orthogonal complement of the common left space),
   keep the top-n triplets of each w_t.
3. Stack task blocks then the common block: U = [U_1 … U_T | U_c], V likewise, S = [S_1 … S_T, S_c].
4. Whiten U and V with the orthonormal polar factor (:func:`primerge.linalg.polar`); set every
   singular value to mean(S), τ = α · mean(S) · Û V̂ᵀ.

α = 1.0 for both (PRIME paper Table 2 lists only Iso-CTS's 80% common ratio). Non-matrix
parameters take α times the mean (the SVD family's fallback).

[decision] Null singular directions (σ numerically zero, :func:`primerge.linalg.drop_null`) get
no share of the flat spectrum: a rank-deficient sum (LoRA task vectors, whose total rank is
below r_full) would otherwise spread mean(S) over an arbitrary completion of its basis. The
mean itself is still over r_full values (null ones count as zero). Iso-CTS's task-specific
parts are judged null against each task vector's own norm ‖τ_t‖_F, so rounding left by the
projection off the common space is not mistaken for a direction.

Iso-C keeps LoRA task vectors factored: when every task is low-rank, the SVD of Σ_t τ_t comes
from the concatenated factors (:meth:`primerge.methods.stack.TaskStack.sum_svd`). Iso-CTS
materialises the stack (its task-specific SVDs follow a projection of every task vector).

Under ``svd: auto`` a 16-bit output lets Iso-CTS's block Krylov triplets be certified
(:mod:`primerge.linalg.certificate`). The flat spectrum writes every kept direction with mean(S),
so a member's backward error reaches the update through its polar factor, with gain
|α|·hypot(s̄/θ_k, 1); the common SVD and the T task-specific ones share the allowance, and s̄ is
bounded before each SVD from what is known then (:func:`mean_ceiling`).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

from primerge.linalg import SVD, OutputPrecision, drop_null, live_polar, project_out, truncated_svd
from primerge.linalg.certificate import Combination, combined
from primerge.methods.base import SVDParams, TensorContext, merge_method
from primerge.methods.stack import TaskStack
from primerge.methods.tsv import concat_factors


class IsoCParams(SVDParams):
    """Iso-C has only the shared α. ``svd`` is accepted like every SVD method's, but Iso-C needs
    the whole spectrum (its mean), so it always takes the exact SVD."""


class IsoCTSParams(SVDParams):
    common_ratio: float = Field(0.8, ge=0.0, le=1.0, description="fraction of r_full given to the common subspace")


@merge_method("iso_c", IsoCParams, "Iso-C: SVD of the task sum with every singular value set to their mean")
def iso_c(taus: TaskStack, ctx: TensorContext, params: IsoCParams) -> Tensor:
    """α · mean(S) · U Vᵀ with Σ_t τ_t = U S Vᵀ, mean over r_full values (docs/algorithms.md, "iso_c")."""
    full = taus.sum_svd()
    return params.scale * (full.S.sum() / min(taus.shape[-2:])) * (full.U @ full.V.mT)


def iso_cts_ranks(r_full: int, tasks: int, common_ratio: float) -> tuple[int, int]:
    """(k_c, n): common rank and per-task rank, k_c + T·n = r_full (docs/algorithms.md, "iso_cts")."""
    k_c = int(common_ratio * r_full)
    t_tot = round((r_full - k_c) / tasks) * tasks
    t_tot = min(t_tot, (r_full // tasks) * tasks)  # never more than r_full directions in all
    return r_full - t_tot, t_tot // tasks


def iso_cts_svds(shape: tuple[int, int], tasks: int, params: IsoCTSParams,
                 prepass: None = None) -> list[tuple[tuple[int, ...], int]]:
    """Iso-CTS's truncated SVDs: Σ_t τ_t at rank k_c and the T projected task vectors at rank n."""
    k_c, n = iso_cts_ranks(min(shape), tasks, params.common_ratio)
    return [(batch, rank) for batch, rank in ((shape, k_c), ((tasks, *shape), n)) if rank > 0]


def mean_ceiling(r_full: int, known: float, *pending: tuple[int, Tensor]) -> float:
    """A bound on s̄ = mean(S) over the r_full flat values before every SVD has run: ``known`` is the
    sum of the values found so far, and each ``pending`` (rank, norms) adds matrices whose top-rank
    values are still to come, Σ_{j≤rank} σ_j ≤ √rank · ‖X‖_F (Cauchy–Schwarz). Ritz values lie
    below the singular values, so the bound holds whichever SVD path finds them."""
    return (known + sum(math.sqrt(rank) * float(norms.sum()) for rank, norms in pending)) / r_full


@merge_method("iso_cts", IsoCTSParams, "Iso-CTS: common + task-specific subspaces, whitened, with a flat spectrum",
              svd_requests=iso_cts_svds)
def iso_cts(stack: TaskStack, ctx: TensorContext, params: IsoCTSParams) -> Tensor:
    """α · mean(S) · Û V̂ᵀ over the whitened task-specific and common bases (docs/algorithms.md, "iso_cts")."""
    taus, T = stack.dense(), stack.T
    r_full = min(taus.shape[-2:])
    k_c, n = iso_cts_ranks(r_full, T, params.common_ratio)
    norms = taus.reshape(T, -1).norm(dim=1)

    def written(level: float) -> OutputPrecision | None:
        """The output precision for SVD members written flat at s̄ ≤ ``level`` (certificate docstring, 3)."""
        return combined(ctx.precision, Combination((k_c > 0) + T * (n > 0), abs(params.scale), level))

    blocks: list[SVD] = []  # task-specific blocks first, then the common one
    common = None
    if k_c > 0:
        total = taus.sum(0)
        level = mean_ceiling(r_full, 0.0, (k_c, total.norm()), (n, norms))
        common = drop_null(truncated_svd(total, k_c, mode=params.svd, seed=ctx.seed, precision=written(level)),
                           total.shape)
    if n > 0:
        specific = taus if common is None else project_out(common.U, taus)
        known = 0.0 if common is None else float(common.S.sum())
        level = mean_ceiling(r_full, known, (n, specific.reshape(T, -1).norm(dim=1)))
        own = drop_null(truncated_svd(specific, n, mode=params.svd, seed=ctx.seed, precision=written(level)),
                        taus.shape, norms)
        blocks.append(concat_factors(own))
    if common is not None:
        blocks.append(common)
    S = torch.cat([b.S for b in blocks])
    U_hat = live_polar(torch.cat([b.U for b in blocks], dim=1), S)
    V_hat = live_polar(torch.cat([b.V for b in blocks], dim=1), S)
    return params.scale * S.mean() * (U_hat @ V_hat.mT)
