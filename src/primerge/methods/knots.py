"""KnOTS: merging in an aligned SVD space (Stoica et al., "Model merging with SVD to tie the
KnOTS", ICLR 2025, arXiv 2410.19735).

Sources: the paper's stored text as the search tool returns it (abstract and summaries of its
Figure 1 and method: concatenate the task updates column-wise, take the SVD, UΣ is a basis shared
by every task, an existing merging method merges the task blocks V⁽ⁱ⁾ᵀ, and U Σ V⁽ᵐᵉʳᵍᵉᵈ⁾ᵀ is the
merged update); the details as the authors' code runs them (gstoica27/KnOTS, ``task_merger.py``,
``SVDMerger``; FusionBench's ``fusion_bench/method/knots/knots_utils.py``). The method section's
numbered equations were not in the returned text, so equation numbers are not cited here.

Per matrix parameter with task updates τ_t (m × n):

1. [τ_1 … τ_T] = U Σ Vᵀ (m × T·n), keeping the K non-null triplets.
2. Split Vᵀ (K × T·n) into task blocks V_tᵀ (K × n): τ_t = U Σ V_tᵀ exactly, and U is shared.
3. The aligned task matrices are Σ V_tᵀ = Uᵀ τ_t (``representation: sv``, what the authors' code
   merges, "simple and safe for all merging methods"), or V_tᵀ (``v``, Σ applied after merging,
   the paper's wording and the Core Space authors' KnOTS baseline).
4. An existing merge (``inner``: TIES by default, the paper's KnOTS-TIES; Task Arithmetic, DARE,
   TSV or PRIME) merges the T aligned matrices as if they were task vectors, with ``inner_params``.
5. ΔW = U M (sv) or U Σ M (v), for the inner merge's result M (K × n).

LoRA task vectors τ_t = L_t R_t keep their factors: [τ_1 … τ_T] = [L_1 … L_T] · blockdiag(R_t), so
step 1 is :func:`primerge.linalg.factored_svd` (O((m + T·n) K²), K = Σ_t k_t) and the aligned space
is K × n instead of m × n.

Properties (tests/test_methods_wudi_knots_core.py): with Task Arithmetic inside, KnOTS is Task
Arithmetic exactly (U Σ V_tᵀ = τ_t). With ``sv``, U has orthonormal columns, so the SVD-based
merges commute with it: TSV inside KnOTS equals TSV on the full matrices whenever both keep the
same number of directions per task (⌊min(K, n)/T⌋ versus ⌊min(m, n)/T⌋: always for full fine-tunes
with K = m ≤ T·n, and for LoRA tasks of equal rank k, where K = T·k and each task has only k).
Element-wise merges (TIES, DARE) act on the aligned coordinates, which is where KnOTS differs.

[decision] Null triplets are those :func:`primerge.linalg.null_mask` finds (σ ≤ σ₁ · max(m, T·n) ·
eps), not the authors' absolute σ > 1e-5 (float64), which depends on the scale of the weights.
[decision] Rank and density rules of the inner merge refer to the aligned space (TSV keeps
⌊min(K, n)/T⌋ directions per task, PRIME's fraction ρ is of min(K, n), TIES keeps ``density`` of
the K·n entries), as the Core Space authors' TSV does; give PRIME an integer rank to pin it.
[decision] TIES trims per aligned tensor: the authors rank magnitudes over the whole model's
aligned vector, but a whole-model pass in aligned coordinates is not available here, so inner
merges that declare a whole-model pass (``trim_scope: model``, ``rank: auto``) are refused.
[decision] Full fine-tunes are accepted: KnOTS's alignment is defined for any task update (the
paper targets LoRA; its SVD is of the materialised updates). The joint SVD is then of an
m × T·n matrix, the aligned space min(m, T·n) × n.
[decision] Non-matrix parameters (biases, norms, excluded matrices) get the inner merge itself
(TIES, TA, ... on the raw task vectors; TSV and PRIME give α · mean); the authors leave them
unmerged, which for LoRA adapters (τ = 0 there) is the same.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
from pydantic import Field, model_validator
from torch import Tensor

from primerge.util.errors import RecipeError
from primerge.linalg import SVD, factored_svd, null_mask, svd
from primerge.methods.base import MethodParams, TensorContext, get_method, merge_method
from primerge.methods.stack import TaskStack

#: Merges that can run inside an aligned space (KnOTS, Core Space).
InnerMerge = Literal["ties", "task_arithmetic", "dare", "tsv", "prime"]


class AlignedParams(MethodParams):
    """An inner merge and its parameters, applied to task matrices in an aligned space."""

    inner: InnerMerge = Field("ties", description="merge applied inside the aligned space")
    inner_params: dict[str, Any] = Field(default_factory=dict, description="parameters of the inner merge")

    @model_validator(mode="after")
    def _inner_valid(self) -> AlignedParams:
        try:
            params = self.inner_parameters()
        except RecipeError as exc:
            raise ValueError(str(exc)) from None
        if get_method(self.inner).make_prepass(params) is not None:
            raise ValueError(
                f"inner merge '{self.inner}' with these parameters needs a whole-model pass over the "
                "full-space task vectors, which an aligned space does not have; use TIES's "
                "trim_scope: tensor or an explicit PRIME rank"
            )
        return self

    def inner_parameters(self) -> MethodParams:
        """The inner merge's validated parameters."""
        return get_method(self.inner).parameters(self.inner_params)


def merge_inside(aligned: Tensor, ctx: TensorContext, params: AlignedParams) -> Tensor:
    """The inner merge of T aligned task matrices (T, p, q) -> (p, q), as a matrix parameter."""
    inner = TensorContext(ctx.name, "matrix", ctx.seed)
    return get_method(params.inner).apply(aligned, inner, params.inner_parameters())


def inner_on_raw(taus: TaskStack, ctx: TensorContext, params: AlignedParams) -> Tensor:
    """Non-matrix parameters: the inner merge on the raw task vectors."""
    return get_method(params.inner).apply(taus, ctx, params.inner_parameters())


class KnotsParams(AlignedParams):
    representation: Literal["sv", "v"] = Field(
        "sv", description="merge Σ V_tᵀ (authors' code) or V_tᵀ with Σ applied after merging"
    )


class KnotsSpace(NamedTuple):
    """τ_t = U diag(S) V_tᵀ for every task: ``U`` (m, K) orthonormal, ``S`` (K,) > 0 and
    ``blocks`` (T, K, n) holding V_tᵀ."""

    U: Tensor
    S: Tensor
    blocks: Tensor


def joint_svd(taus: TaskStack) -> SVD:
    """Thin SVD of [τ_1 … τ_T] (m × T·n): from [L_1 … L_T] blockdiag(R_t) when every task is
    factored, else from the materialised concatenation."""
    T, m, n = taus.shape
    if taus.dense_index:
        return svd(taus.dense().permute(1, 0, 2).reshape(m, T * n))
    factors = [taus.lowrank[t] for t in range(T)]
    left = torch.cat([f.left for f in factors], dim=1)
    return factored_svd(left, torch.block_diag(*[f.right for f in factors]))


def knots_space(taus: TaskStack) -> KnotsSpace:
    """Steps 1–2: the joint SVD without its null triplets, Vᵀ split into task blocks.

    [decision] A task's row i of V_tᵀ whose share σ_i ‖v_{t,i}‖ is numerically zero against σ₁
    (:func:`primerge.linalg.null_mask`) is set to zero: the task has no component along direction
    i (a task that does not touch this matrix, a LoRA task outside its rank), and the SVD of
    materialised updates leaves rounding there that TIES would keep and count in its disjoint mean.
    """
    T, m, n = taus.shape
    full = joint_svd(taus)
    keep = ~null_mask(full.S, (m, T * n))
    U, S, V = full.U[:, keep], full.S[keep], full.V[:, keep]
    blocks = V.mT.reshape(-1, T, n).permute(1, 0, 2)
    sigma_1 = S[:1].expand(T) if S.numel() else S.new_zeros(T)
    dead = null_mask(S * blocks.norm(dim=-1), (m, T * n), sigma_1)
    return KnotsSpace(U, S, blocks * ~dead.unsqueeze(-1))


@merge_method("knots", KnotsParams, "KnOTS: joint SVD of the task updates, an inner merge (TIES) of the aligned "
              "task blocks", other=inner_on_raw)
def knots(taus: TaskStack, ctx: TensorContext, params: KnotsParams) -> Tensor:
    """U · Merge({Σ V_tᵀ}) (or U Σ · Merge({V_tᵀ})) for one matrix parameter (KnOTS)."""
    space = knots_space(taus)
    if space.S.numel() == 0:
        return taus.dense_rows.new_zeros(taus.shape[1:])
    if params.representation == "sv":
        return space.U @ merge_inside(space.S.unsqueeze(-1) * space.blocks, ctx, params)
    return (space.U * space.S) @ merge_inside(space.blocks, ctx, params)

