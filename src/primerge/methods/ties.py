"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean.

1. Trim: keep each task vector's top ``density`` fraction of entries by |value|
   (per tensor by default; ``trim_scope: model`` ranks over the whole model, as
   the original paper does, using an exact two-pass whole-model pre-pass).
2. Elect: γ = sign(Σ_t trimmed τ_t).
3. Disjoint mean: τ = λ · Σ_t [sign(τ̂_t) = γ] τ̂_t / max(1, #{t : sign(τ̂_t) = γ}).

Defaults follow the PRIME paper's Table 2 (80% pruned, so density 0.2) and λ = 1.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from primerge.methods.base import MethodParams, TensorContext, merge_method, scale_field
from primerge.methods.stack import TaskStack


class TiesParams(MethodParams):
    density: float = Field(0.2, ge=0.0, le=1.0, description="fraction of entries kept per task")
    scale: float = scale_field(1.0, "λ applied to the merged update (alias: alpha)")
    trim_scope: Literal["tensor", "model"] = Field(
        "tensor", description="rank magnitudes within each tensor or over the whole model"
    )


def tensor_thresholds(taus: Tensor, density: float) -> Tensor:
    """Per-task magnitude thresholds keeping the top ``round(density · N)`` of N entries.

    Returns shape (T,): the k-th largest |τ_t| (``inf`` when k = 0, so nothing is kept).
    One task at a time, so the temporaries are the size of one task vector.
    """
    flat = taus.reshape(taus.shape[0], -1)
    n = flat.shape[1]
    k = round(density * n)
    if k == 0:
        return torch.full((taus.shape[0],), math.inf, dtype=taus.dtype, device=taus.device)
    return torch.stack([row.abs().kthvalue(n - k + 1).values for row in flat])


def ties_merge(taus: Tensor, thresholds: Tensor, scale: float = 1.0) -> Tensor:
    """Trim with per-task ``thresholds`` (keep |τ_t| ≥ thr_t), elect signs, disjoint mean, scale.

    With τ̂_t = τ_t · [|τ_t| ≥ thr_t]: γ = sign(Σ_t τ̂_t), agree_t = [sign(τ̂_t) = γ], and
    τ = λ Σ_t agree_t τ̂_t / max(1, Σ_t agree_t). Where γ = 0 only zero τ̂_t agree, so the
    update is 0 there whatever the count. Tasks are visited one at a time (two passes), so
    the temporaries are a few tensors of one task's size, not T of them.
    """
    def trimmed(t: int) -> Tensor:
        return torch.where(taus[t].abs() >= thresholds[t], taus[t], 0.0)

    elected = torch.zeros_like(taus[0])
    for t in range(taus.shape[0]):
        elected += trimmed(t)
    elected.sign_()
    total = torch.zeros_like(elected)
    count = torch.zeros_like(elected)
    for t in range(taus.shape[0]):
        kept = trimmed(t)
        agree = torch.sign(kept) == elected
        total += torch.where(agree, kept, 0.0)
        count += agree
    return scale * total / count.clamp_min_(1)


def disjoint_mean(taus: Tensor, scale: float = 1.0) -> Tensor:
    """Sign election and disjoint mean with nothing trimmed (:func:`ties_merge` at zero thresholds),
    times λ: the combine step DELLA, DRM and DARE-TIES share with TIES."""
    return ties_merge(taus, torch.zeros(taus.shape[0], dtype=taus.dtype, device=taus.device), scale)


class ModelTrimPrepass:
    """Exact whole-model top-k magnitude threshold per task, in two streaming passes.

    Pass 0 counts, per task, the nonzero |τ_t| entries of every tensor in log-spaced bins
    (``BINS_PER_OCTAVE`` per power of two) and finds the bin that holds the k-th largest value,
    k = round(density · N_t) over all N_t entries. Pass 1 collects only the values inside that bin
    and selects the exact k-th largest among them. Memory: the histogram plus one bin's values,
    never the model. Both statistics reduce exactly (integer counts, concatenated values), so any
    split of the model into units gives the same thresholds.
    """

    BINS_PER_OCTAVE = 64
    LOW_EXPONENT = -150  # below the smallest float32 subnormal
    HIGH_EXPONENT = 129  # above the largest float32
    passes = 2

    def __init__(self, density: float) -> None:
        self.density = density
        self.bins = (self.HIGH_EXPONENT - self.LOW_EXPONENT) * self.BINS_PER_OCTAVE
        self.target_bin: list[int | None] = []
        self.needed: list[int] = []
        self.thresholds: Tensor | None = None

    def _bin_index(self, magnitudes: Tensor) -> Tensor:
        scaled = (torch.log2(magnitudes) - self.LOW_EXPONENT) * self.BINS_PER_OCTAVE
        return scaled.floor().long().clamp_(0, self.bins - 1)

    def observe(self, pass_index: int, taus: TaskStack, ctx: TensorContext):
        """Pass 0: (per-task bin counts (T, bins), entry counts (T,)); pass 1: [(task, values in its bin)]."""
        flat = taus.dense().reshape(taus.T, -1)
        counts = torch.zeros(taus.T, self.bins, dtype=torch.long)
        in_bin = []
        for t in range(taus.T):  # one task at a time: float64 copies of one row only
            row = flat[t].abs().double().cpu()
            nonzero = row[row > 0]
            idx = self._bin_index(nonzero)
            if pass_index == 0:
                counts[t] = torch.bincount(idx, minlength=self.bins)
            elif self.target_bin[t] is not None:
                in_bin.append((t, nonzero[idx == self.target_bin[t]]))
        if pass_index == 0:
            return counts, torch.full((taus.T,), flat.shape[1], dtype=torch.long)
        return in_bin

    def combine(self, first, second):
        if isinstance(first, list):
            return first + second
        return first[0] + second[0], first[1] + second[1]

    def end_pass(self, pass_index: int, total) -> None:
        if total is None:
            self.thresholds = torch.empty(0)
        elif pass_index == 0:
            self._find_bins(*total)
        else:
            for t, b in enumerate(self.target_bin):
                if b is not None:
                    values = torch.cat([v for task, v in total if task == t])
                    self.thresholds[t] = values.topk(self.needed[t]).values[-1]

    def _find_bins(self, counts: Tensor, sizes: Tensor) -> None:
        """The bin holding each task's k-th largest magnitude, and how many of that bin to keep."""
        self.thresholds = torch.zeros(counts.shape[0], dtype=torch.float64)
        for t, row in enumerate(counts):
            self.target_bin.append(None)
            self.needed.append(0)
            k = round(self.density * int(sizes[t]))
            if k == 0:
                self.thresholds[t] = math.inf
                continue
            from_top = row.flip(0).cumsum(0)
            if k > int(from_top[-1]):  # more than the nonzeros: keep every nonzero
                continue
            j = int((from_top < k).sum())
            b = self.bins - 1 - j
            self.target_bin[t] = b
            self.needed[t] = k - (int(from_top[j]) - int(row[b]))

    def result(self) -> Tensor:
        return self.thresholds


def make_prepass(params: TiesParams) -> ModelTrimPrepass | None:
    return ModelTrimPrepass(params.density) if params.trim_scope == "model" else None


@merge_method("ties", TiesParams, "TIES: trim to top-density magnitudes, elect signs, disjoint mean",
              family="elementwise", prepass=make_prepass)
def merge(taus: TaskStack, ctx: TensorContext, params: TiesParams) -> Tensor:
    """TIES merge of one tensor; thresholds from the model-wide pre-pass when declared."""
    dense = taus.dense()
    if params.trim_scope == "model":
        thresholds = ctx.prepass.to(device=dense.device, dtype=dense.dtype)
    else:
        thresholds = tensor_thresholds(dense, params.density)
    return ties_merge(dense, thresholds, params.scale)
