"""Core Space merging of low-rank task updates (Panariello et al., "Accurate and Efficient Low-Rank
Model Merging in Core Space", NeurIPS 2025, arXiv 2509.17786).

Sources: the paper's stored text as the search tool returns it (abstract, introduction and
summaries of its method: SVDs of the stacked LoRA factors give reference bases spanning every
task's subspace, each task is projected to a small core matrix, any merging method runs there,
projection into Core Space loses no information, with zero alignment error for linear merges);
the details as the authors' code runs them (apanariello4/core-space-merging, ``task_merger.py``,
``get_core_matrices``). The method section's numbered equations were not in the returned text,
so equation numbers are not cited here.

Per matrix parameter with LoRA updates τ_t = B_t A_t (B_t: m × k_t, A_t: k_t × n):

1. Reference bases: U_B, the left singular vectors of [B_1 … B_T] (m × Σk_t), and V_A, the right
   singular vectors of [A_1; …; A_T] (Σk_t × n), non-null directions only (K_B and K_A of them).
2. Core matrices M_t = U_Bᵀ B_t A_t V_A (K_B × K_A). Since every column space of B_t lies in
   span(U_B) and every row space of A_t in span(V_A), τ_t = U_B M_t V_Aᵀ exactly: no information
   is lost.
3. An existing merge (``inner``: TSV by default, the authors' example; Task Arithmetic, TIES,
   DARE or PRIME) merges the T core matrices as if they were task vectors, with ``inner_params``.
4. ΔW = U_B M V_Aᵀ for the inner merge's result M.

Cost: two SVDs of m × Σk_t and Σk_t × n and T products of k_t-thin factors, then the inner merge
on (Σk_t)² entries, instead of any m × n decomposition (KnOTS's joint SVD is m × T·n).

Properties (tests/test_methods_wudi_knots_core.py): with Task Arithmetic inside, Core Space is
Task Arithmetic exactly (the paper's zero alignment error for linear merges). U_B and V_A have
orthonormal columns, so TSV inside Core Space equals TSV on the full matrices whenever both keep the
same directions per task (⌊min(K_B, K_A)/T⌋ ≥ every task's rank, e.g. generic LoRA adapters of
equal rank), and PRIME with an integer rank r equals full-space PRIME with rank r when T·r fits.

[decision] Factors as the engine hands them: B_t = w_t·s_t·B (task weight, LoRA scale) and A_t = A.
Only the bases' order and signs depend on that split (their spans do not); with one scale for
all tasks they are the authors' bases.
[decision] Null directions (:func:`primerge.linalg.null_mask`) are dropped from the bases, so a
rank-deficient stack (two adapters sharing a factor) does not bring arbitrary completions.
[decision] A full fine-tune (dense τ_t) is factored by its own thin SVD, τ_t = (U_t S_t^½)(S_t^½ V_tᵀ)
without null triplets: the construction needs only some τ_t = B_t A_t, and this one is exact. Mixed
stacks (adapters and full fine-tunes, modules_to_save matrices) then merge in one space. For full-rank
full fine-tunes Core Space is the whole space in rotated coordinates: TA and TSV give their full-space
result, TIES and DARE act on the rotated coordinates, and there is no speed-up.
[decision] Rank and density rules of the inner merge refer to the core space (as the authors' TSV:
⌊K/T⌋ directions per task), inner merges that need a whole-model pass are refused, and non-matrix
parameters get the inner merge on the raw task vectors (see :mod:`primerge.methods.knots`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pydantic import Field
from torch import Tensor

from primerge.linalg import drop_null, null_mask, svd
from primerge.methods.base import TensorContext, merge_method
from primerge.methods.knots import AlignedParams, InnerMerge, inner_on_raw, merge_inside
from primerge.methods.stack import LowRank, TaskStack


class CoreSpaceParams(AlignedParams):
    inner: InnerMerge = Field("tsv", description="merge applied inside the core space")


class CoreSpace(NamedTuple):
    """τ_t = U_B cores[t] V_Aᵀ for every task: ``left`` U_B (m, K_B) and ``right`` V_A (n, K_A) with
    orthonormal columns, ``cores`` (T, K_B, K_A)."""

    left: Tensor
    right: Tensor
    cores: Tensor


def task_factors(taus: TaskStack) -> list[LowRank]:
    """τ_t = B_t A_t for every task: LoRA factors as given; a dense τ_t by its thin SVD, with its
    singular values split evenly, B_t = U_t S_t^½ and A_t = S_t^½ V_tᵀ (null triplets dropped)."""
    factors = []
    for t in range(taus.T):
        if t in taus.lowrank:
            factors.append(taus.lowrank[t])
            continue
        tau = taus.dense_rows[taus.dense_index.index(t)]
        full = drop_null(svd(tau), tau.shape)
        live, root = full.S > 0, full.S.sqrt()
        factors.append(LowRank((full.U * root)[:, live], (full.V * root)[:, live].mT))
    return factors


def reference_basis(stacked: Tensor, side: int) -> Tensor:
    """Orthonormal basis of the column (``side`` 0: left singular vectors) or row space (1: right)
    of ``stacked``, non-null directions only.

    [decision] The SVD runs in float64, as in the authors' code: the stacked factors of similar
    adapters have clustered singular values, whose float32 singular vectors move with rounding
    (measured: 1e-5 between one and two LAPACK threads). Nullity is judged at the stack's own
    precision (:func:`primerge.linalg.null_mask`), so float32 rounding is not taken for a direction.
    """
    full = svd(stacked.double())
    basis = (full.U if side == 0 else full.V).to(stacked.dtype)
    return basis[:, ~null_mask(full.S.to(stacked.dtype), tuple(stacked.shape))]


def core_space(taus: TaskStack) -> CoreSpace:
    """Steps 1–2: reference bases from the stacked factors, and the task cores U_Bᵀ B_t A_t V_A."""
    factors = task_factors(taus)
    U_B = reference_basis(torch.cat([f.left for f in factors], dim=1), 0)
    V_A = reference_basis(torch.cat([f.right for f in factors], dim=0), 1)
    cores = torch.stack([(U_B.mT @ f.left) @ (f.right @ V_A) for f in factors])
    return CoreSpace(U_B, V_A, cores)


@merge_method("core_space", CoreSpaceParams, "Core Space: LoRA updates projected on reference bases of their "
              "stacked factors, merged there (TSV)", other=inner_on_raw)
def merge(taus: TaskStack, ctx: TensorContext, params: CoreSpaceParams) -> Tensor:
    """U_B · Merge({M_t}) · V_Aᵀ for one matrix parameter (Core Space merging)."""
    space = core_space(taus)
    if 0 in space.cores.shape[1:]:
        return taus.dense_rows.new_zeros(taus.shape[1:])
    return space.left @ merge_inside(space.cores, ctx, params) @ space.right.mT

