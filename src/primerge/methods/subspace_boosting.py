"""Subspace Boosting (SB paper, Section 4.1 and Algorithm 1; PRIME paper, Appendix M, Eqs. 24–27).

A post-process of a merged task vector. First the base merge (``base_merge``: Task
Arithmetic, TIES or Consensus, run through their registered merge functions with
``base_params``); then, for every matrix parameter, M = U S Vᵀ and, with
c = cumsum(S)/sum(S) and i the first index where c_i ≥ β (the last index if none),
S' = max(S, S[i]) and τ = α · U S' Vᵀ (:func:`primerge.linalg.flatten_spectrum`). β = 0 raises
every singular value to σ₁ (PRIME Eq. 27); β = 1 leaves a full-rank spectrum unchanged.

Attention projections fused in one tensor are boosted per Q, K, V slice (docs/algorithms.md,
"subspace_boosting"): a matrix whose name matches ``qkv_pattern`` (``re.search``) and whose first
dimension is three times its second is split into thirds along the first axis.
[decision] The transposed layout, second dimension three times the first, is split along the
second axis: that is how GPT-2's ``c_attn`` (a Conv1D, stored (in, 3·out)) keeps Q, K and V.

[decision] Null directions (σ numerically zero, :func:`primerge.linalg.drop_null`) are not
lifted: a rank-deficient merge (LoRA task vectors) would otherwise gain σ₁ along an arbitrary
completion of its basis. With a Task Arithmetic base, LoRA task vectors stay factored (the boost
is taken from the SVD of their factored sum); other base merges materialise them.

Non-matrix parameters (biases, norms, excluded embeddings) take the base merge unboosted.
Defaults: β = 0.0 (PRIME paper, Table 2), base Task Arithmetic with its λ = 1/T (PRIME
Appendix N, Eq. 28), α = 1.0.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator
from torch import Tensor

from primerge.util.errors import RecipeError
from primerge.linalg import SVD, drop_null, flatten_spectrum, svd
from primerge.methods.base import (MethodParams, Prepass, TensorContext, get_method, merge_method, scale_field,
                                   uniform_scale)
from primerge.methods.fused import FusedQKVParams, fused_qkv_axis, per_slice
from primerge.methods.stack import TaskStack


def boost_svd(full: SVD, beta: float) -> Tensor:
    """U max(S, S[i]) Vᵀ from a thin SVD whose null triplets are zeroed (they stay at 0)."""
    return SVD(full.U, flatten_spectrum(full.S, beta), full.V).reconstruct()


def boost(matrix: Tensor, beta: float) -> Tensor:
    """U max(S, S[i]) Vᵀ for M = U S Vᵀ (SB Algorithm 1; exact SVD), null directions left at 0."""
    return boost_svd(drop_null(svd(matrix), matrix.shape), beta)


class SubspaceBoostingParams(FusedQKVParams):
    base_merge: Literal["task_arithmetic", "ties", "consensus"] = Field(
        "task_arithmetic", description="merge whose result is boosted"
    )
    base_params: dict[str, Any] = Field(default_factory=dict, description="parameters of the base merge")
    beta: float = Field(0.0, ge=0.0, le=1.0, description="β: cumulative-spectrum cutoff of the boost")
    scale: float = scale_field(1.0, "α scaling the boosted update (alias: alpha)")
    split_qkv: bool = Field(True, description="boost fused Q/K/V weights per slice")

    @model_validator(mode="after")
    def _base_params_valid(self) -> SubspaceBoostingParams:
        try:
            self.base()
        except RecipeError as exc:
            raise ValueError(str(exc)) from None
        return self

    def base(self) -> MethodParams:
        """The base merge's validated parameters."""
        return get_method(self.base_merge).parameters(self.base_params)


def base_merge(taus: TaskStack, ctx: TensorContext, params: SubspaceBoostingParams) -> Tensor:
    """Non-matrix parameters: α · BaseMerge({τ_t}), unboosted."""
    return params.scale * get_method(params.base_merge).apply(taus, ctx, params.base())


def make_prepass(params: SubspaceBoostingParams) -> Prepass | None:
    """The base merge's whole-model pass, if it needs one (TIES with ``trim_scope: model``)."""
    return get_method(params.base_merge).make_prepass(params.base())


@merge_method("subspace_boosting", SubspaceBoostingParams,
              "Subspace Boosting: a TA/TIES/Consensus merge with its small singular values raised",
              other=base_merge, prepass=make_prepass)
def merge(taus: TaskStack, ctx: TensorContext, params: SubspaceBoostingParams) -> Tensor:
    """α · Boost_β(BaseMerge({τ_t})) for one matrix parameter (per Q/K/V slice when fused).

    With a Task Arithmetic base and LoRA task vectors kept as factors, Boost(λ Σ_t τ_t) =
    λ · Boost(Σ_t τ_t) (the lift is positively homogeneous and odd) is computed from the SVD of
    the factored sum (:meth:`primerge.methods.stack.TaskStack.sum_svd`), never forming T dense
    task vectors.
    """
    axis = fused_qkv_axis(ctx.name, tuple(taus.shape[1:]), params.qkv_pattern) if params.split_qkv else None
    if taus.factored and params.base_merge == "task_arithmetic" and axis is None:
        scale = uniform_scale(params.base().scale, taus.T)
        return params.scale * scale * boost_svd(taus.sum_svd(), params.beta)
    merged = get_method(params.base_merge).apply(taus, ctx, params.base())
    if axis is None:
        return params.scale * boost(merged, params.beta)
    return params.scale * per_slice(lambda part: boost(part, params.beta), merged, axis)
