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

from primerge.methods.base import MethodParams, MethodSpec, TensorContext, register


class TiesParams(MethodParams):
    density: float = Field(0.2, ge=0.0, le=1.0, description="fraction of entries kept per task")
    scale: float = Field(1.0, description="λ applied to the merged update")
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


class ModelTrimPrepass:
    """Exact whole-model top-k magnitude threshold per task, in two streaming passes.

    Pass 0 counts, per task, the nonzero |τ_t| entries of every tensor in
    log-spaced bins (``BINS_PER_OCTAVE`` per power of two) and finds the bin that
    holds the k-th largest value, k = round(density · N_t) over all N_t entries.
    Pass 1 collects only the values inside that bin and selects the exact k-th
    largest among them. Memory: the histogram plus one bin's values, never the model.
    """

    BINS_PER_OCTAVE = 64
    LOW_EXPONENT = -150  # below the smallest float32 subnormal
    HIGH_EXPONENT = 129  # above the largest float32
    passes = 2

    def __init__(self, density: float) -> None:
        self.density = density
        self.bins = (self.HIGH_EXPONENT - self.LOW_EXPONENT) * self.BINS_PER_OCTAVE
        self.counts: Tensor | None = None
        self.sizes: Tensor | None = None
        self.target_bin: list[int | None] = []
        self.needed: list[int] = []
        self.in_bin: list[list[Tensor]] = []
        self.thresholds: Tensor | None = None

    def _bin_index(self, magnitudes: Tensor) -> Tensor:
        scaled = (torch.log2(magnitudes) - self.LOW_EXPONENT) * self.BINS_PER_OCTAVE
        return scaled.floor().long().clamp_(0, self.bins - 1)

    def observe(self, pass_index: int, taus: Tensor, ctx: TensorContext) -> None:
        flat = taus.reshape(taus.shape[0], -1)
        if self.counts is None:
            self.counts = torch.zeros(flat.shape[0], self.bins, dtype=torch.long)
            self.sizes = torch.zeros(flat.shape[0], dtype=torch.long)
            self.in_bin = [[] for _ in range(flat.shape[0])]
        for t in range(flat.shape[0]):  # one task at a time: float64 copies of one row only
            row = flat[t].abs().double().cpu()
            nonzero = row[row > 0]
            idx = self._bin_index(nonzero)
            if pass_index == 0:
                self.sizes[t] += row.numel()
                self.counts[t] += torch.bincount(idx, minlength=self.bins)
            elif self.target_bin[t] is not None:
                self.in_bin[t].append(nonzero[idx == self.target_bin[t]])

    def end_pass(self, pass_index: int) -> None:
        if self.counts is None:
            self.thresholds = torch.empty(0)
            return
        if pass_index == 0:
            self.thresholds = torch.zeros(self.counts.shape[0], dtype=torch.float64)
            for t, counts in enumerate(self.counts):
                self.target_bin.append(None)
                self.needed.append(0)
                k = round(self.density * int(self.sizes[t]))
                if k == 0:
                    self.thresholds[t] = math.inf
                    continue
                from_top = counts.flip(0).cumsum(0)
                if k > int(from_top[-1]):  # more than the nonzeros: keep every nonzero
                    continue
                j = int((from_top < k).sum())
                b = self.bins - 1 - j
                self.target_bin[t] = b
                self.needed[t] = k - (int(from_top[j]) - int(counts[b]))
        else:
            for t, b in enumerate(self.target_bin):
                if b is not None:
                    values = torch.cat(self.in_bin[t])
                    self.thresholds[t] = values.topk(self.needed[t]).values[-1]
            self.in_bin = []

    def result(self) -> Tensor:
        return self.thresholds


def merge(taus: Tensor, ctx: TensorContext, params: TiesParams) -> Tensor:
    """TIES merge of one tensor; thresholds from the model-wide pre-pass when declared."""
    if params.trim_scope == "model":
        thresholds = ctx.prepass.to(device=taus.device, dtype=taus.dtype)
    else:
        thresholds = tensor_thresholds(taus, params.density)
    return ties_merge(taus, thresholds, params.scale)


def make_prepass(params: TiesParams) -> ModelTrimPrepass | None:
    return ModelTrimPrepass(params.density) if params.trim_scope == "model" else None


SPEC = register(
    MethodSpec(
        name="ties",
        description="TIES: trim to top-density magnitudes, elect signs, disjoint mean",
        params_model=TiesParams,
        merge=merge,
        family="elementwise",
        prepass=make_prepass,
    )
)
