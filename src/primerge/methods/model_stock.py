"""Model Stock (Jang et al. 2024): move from the base towards the average of k ≥ 2 fine-tunes by
a ratio set by the angle between their task vectors.

For k fine-tunes whose task vectors τ_t meet at angle θ, the paper's interpolation ratio (Section 3,
its k-model generalisation of the two-model ratio 2 cos θ / (1 + cos θ)) is

    t = k cos θ / (1 + (k − 1) cos θ),        θ_merged = θ₀ + t · (1/k) Σ_t τ_t,

i.e. t·θ_avg + (1 − t)·θ₀ with θ_avg the fine-tunes' average. The paper applies it per layer;
here, as in mergekit, cos θ is the mean of the pairwise cosines cos(τ_i, τ_j), i < j, each with
its norm product floored at 1e-6 and clamped to [−1, 1], computed over the whole tensor, or per
row of its last axis with ``filter_wise`` (a 1-D tensor is one row either way). Where
|1 + (k − 1) cos θ| < 1e-6 the ratio has no finite value and t = 0 keeps the base (mergekit 0.1.5).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from primerge.methods.base import MethodParams, TensorContext, merge_method
from primerge.methods.stack import TaskStack

#: Norm products are floored here before dividing (mergekit's 1e-6).
NORM_PRODUCT_FLOOR = 1e-6
#: |1 + (k − 1) cos θ| below this is singular: t = 0.
SINGULAR = 1e-6


class ModelStockParams(MethodParams):
    filter_wise: bool = Field(False, description="one ratio per row of the last axis instead of one per tensor")


def mean_pairwise_cosine(vectors: Tensor) -> Tensor:
    """Mean over pairs i < j of cos(v_i, v_j) along the last axis of ``vectors`` (k, ..., n), keepdim."""
    norms = torch.linalg.vector_norm(vectors, dim=-1)
    cosines = [((vectors[i] * vectors[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=NORM_PRODUCT_FLOOR)).clamp(-1, 1)
               for i in range(len(vectors)) for j in range(i + 1, len(vectors))]
    return torch.stack(cosines).mean(0).unsqueeze(-1)


def stock_ratio(cos: Tensor, k: int) -> Tensor:
    """t = k cos θ / (1 + (k − 1) cos θ) (Model Stock, Section 3), 0 where the denominator vanishes."""
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < SINGULAR
    return torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, 1.0, denominator))


@merge_method("model_stock", ModelStockParams, "Model Stock: base-to-average ratio t = k cos θ / (1 + (k-1) cos θ) "
              "from the fine-tunes' mean pairwise angle, per tensor or per row", family="elementwise",
              models=(2, None))
def merge(taus: TaskStack, ctx: TensorContext, params: ModelStockParams) -> Tensor:
    """t · mean_t τ_t for one tensor (t per row with ``filter_wise``)."""
    dense = taus.dense()
    if params.filter_wise:
        vectors = dense.reshape(taus.T, 1, -1) if dense.dim() <= 2 else dense
    else:
        vectors = dense.reshape(taus.T, -1)
    ratio = stock_ratio(mean_pairwise_cosine(vectors), taus.T)
    return (ratio * vectors.mean(0)).reshape(dense.shape[1:])
