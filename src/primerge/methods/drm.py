"""DRM, Decom-Renorm-Merge (DRM paper, Section 4.2, Eqs. 1–10; Appendix H.3).

DRM-H, per matrix parameter with task deltas Δ_t (m × n):

1. Joint decomposition: [Δ_1 … Δ_T] = U Σ Vᵀ (m × T·n, Eqs. 1–2), keeping the singular values
   σ_i > ``rank_tol`` · σ_max (k of them).
2. Partition Vᵀ (k × T·n) into task blocks V_tᵀ (k × n), so Δ_t = U Σ V_tᵀ (Eqs. 3–4).
3. Renormalise: ṽ_{t,i} = v_{t,i}/‖v_{t,i}‖ for every row; the norms move into per-task singular
   values Σ_t = Σ · diag(‖v_{t,i}‖) (Eqs. 5–6), so Δ_t = U Σ_t Ṽ_tᵀ still holds.
   [decision] A row whose share σ_i ‖v_{t,i}‖ is numerically zero against σ_max
   (:func:`primerge.linalg.null_mask`) is a zero row: task t has no component along direction
   i (e.g. a LoRA task vector outside its own rank), and renormalising its rounding noise to
   unit length would let noise compete in the joint prune and count in the disjoint mean.
4. Joint prune: keep the top ``density`` fraction of |Ṽ_tᵀ| entries ranked over all tasks'
   blocks together (Section 4.2 step 4 with the joint variant of Appendix H.3).
5. Multiply the scales back (Σ_t Ṽ_tᵀ), elect γ = sgn(Σ_t Σ_t Ṽ_tᵀ), zero the entries of the
   other sign, and take the disjoint mean over the remaining non-zeros times λ (Eqs. 7–8).
6. Reconstruct ΔW = U (ΣṼᵀ)^M (Eq. 9).

DRM-V runs the same on the vertical stack [Δ_1; …; Δ_T] = U Σ Vᵀ with U split into task blocks
and its columns renormalised; since [Δ_1; …; Δ_T]ᵀ = [Δ_1ᵀ … Δ_Tᵀ], DRM-V(Δ) = DRM-H(Δᵀ)ᵀ.

Other parameters (biases, norms, excluded matrices) get TIES-style sign election and disjoint
mean (no trim) times λ (docs/algorithms.md, "drm"), registered as the ``svd`` family's fallback.

Defaults: density 0.2 (top 20%), λ = 1.0, rank_tol = 1e-2 (docs/algorithms.md, "drm"). Fused Q/K/V weights
may be merged per third (``split_qkv``); [decision] off by default, as the DRM paper applies
the method to the stacked QKV matrix and found no difference (Appendix I).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from pydantic import Field
from torch import Tensor

from primerge.linalg import null_mask, svd
from primerge.methods.base import TensorContext, merge_method, scale_field
from primerge.methods.fused import FusedQKVParams, fused_qkv_axis, per_slice
from primerge.methods.stack import TaskStack
from primerge.methods.ties import disjoint_mean, tensor_thresholds


class DRMParams(FusedQKVParams):
    variant: Literal["H", "V"] = Field("H", description="H: horizontal stack, shared U; V: vertical, shared V")
    density: float = Field(0.2, ge=0.0, le=1.0, description="fraction of joint-space entries kept (joint prune)")
    scale: float = scale_field(1.0, "λ applied to the disjoint mean (alias: alpha)")
    rank_tol: float = Field(1e-2, ge=0.0, lt=1.0, description="keep singular values above rank_tol · σ_max")
    split_qkv: bool = Field(False, description="merge fused Q/K/V weights per third")


class JointSpace(NamedTuple):
    """DRM-H's renormalised joint space: Δ_t = U diag(scales[t]) blocks[t] for every task.

    ``U``: (m, k) shared left singular vectors; ``scales``: (T, k) per-task singular values
    Σ_t = σ_i ‖v_{t,i}‖; ``blocks``: (T, k, n) renormalised rows ṽ_{t,i} (unit norm, or zero
    where the task has no component along direction i).
    """

    U: Tensor
    scales: Tensor
    blocks: Tensor


def joint_space(taus: Tensor, rank_tol: float = 1e-2) -> JointSpace:
    """Steps 1–3 of DRM-H: joint SVD of [Δ_1 … Δ_T], partition of Vᵀ, row renormalisation."""
    T, m, n = taus.shape
    full = svd(taus.permute(1, 0, 2).reshape(m, T * n))
    k = int((full.S > rank_tol * full.S[0]).sum()) if full.S.numel() else 0
    U, S = full.U[:, :k], full.S[:k]
    rows = full.V[:, :k].mT.reshape(k, T, n).permute(1, 0, 2)  # (T, k, n): task blocks V_tᵀ
    norms = rows.norm(dim=-1)
    norms = torch.where(null_mask(S * norms, (m, T * n), full.S[:1].expand(T)), 0.0, norms)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return JointSpace(U, S * norms, rows / safe.unsqueeze(-1) * (norms > 0).unsqueeze(-1))


def joint_prune(blocks: Tensor, density: float) -> Tensor:
    """Mask of the top ``round(density · N)`` |entries| over all N entries of all tasks' blocks."""
    threshold = tensor_thresholds(blocks.reshape(1, -1), density)[0]
    return (blocks.abs() >= threshold) & (blocks != 0)


def drm_h(taus: Tensor, params: DRMParams) -> Tensor:
    """DRM-H merge of one matrix: U · λ · disjoint-mean(sign-elected Σ_t prune(Ṽ_tᵀ))."""
    space = joint_space(taus, params.rank_tol)
    keep = joint_prune(space.blocks, params.density)
    zero = torch.zeros((), dtype=taus.dtype, device=taus.device)
    scaled = space.scales.unsqueeze(-1) * torch.where(keep, space.blocks, zero)
    return space.U @ disjoint_mean(scaled, params.scale)


def drm_matrix(taus: Tensor, params: DRMParams) -> Tensor:
    """DRM-H, or DRM-V as DRM-H of the transposed deltas, transposed back."""
    if params.variant == "H":
        return drm_h(taus, params)
    return drm_h(taus.mT, params).mT


def elect_mean(taus: TaskStack, ctx: TensorContext, params: DRMParams) -> Tensor:
    """Non-matrix parameters: TIES-style sign election and disjoint mean (no trim), times λ."""
    return disjoint_mean(taus.dense(), params.scale)


@merge_method("drm", DRMParams, "DRM: joint SVD, renormalised per-task bases, joint prune, sign election, "
              "disjoint mean", other=elect_mean)
def merge(taus: TaskStack, ctx: TensorContext, params: DRMParams) -> Tensor:
    """DRM of one matrix parameter, per third of a fused Q/K/V weight when ``split_qkv``."""
    axis = fused_qkv_axis(ctx.name, tuple(taus.shape[1:]), params.qkv_pattern) if params.split_qkv else None
    return per_slice(lambda part: drm_matrix(part, params), taus.dense(), axis, tasks=True)
