"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean.

1. Trim: keep each task vector's top ``density`` fraction of entries by |value|
   (per tensor by default; ``trim_scope: model`` ranks over the whole model, as
   the original paper does, using an exact two-pass whole-model pre-pass).
2. Elect: γ = sign(Σ_t trimmed τ_t).
3. Disjoint mean: τ = λ · Σ_t [sign(τ̂_t) = γ] τ̂_t / max(1, #{t : sign(τ̂_t) = γ}).

Defaults follow the PRIME paper's Table 2 (80% pruned, so density 0.2) and λ = 1.

mergekit's ``ties`` differs in three places, each a parameter here (paper's rule by default):
``normalize: weights`` divides by the agreeing models' weights Σ_t agree_t w_t instead of their
count (mergekit ``normalize: true``; ``none`` is its ``normalize: false``, the plain sum);
``rounding: floor`` keeps ⌊density·N⌋ entries, at least one (mergekit) instead of the nearest
integer; ``rescale: l1`` rescales each trimmed τ̂_t to the L1 norm of τ_t (mergekit ``rescale:
true``). mergekit's election also counts an entry whose sum is exactly 0 as positive; the paper's
sign(0) = 0 is kept (the two differ only where Σ_t τ̂_t vanishes exactly). ``density`` may be given
per model.

The models' weights multiply the trimmed τ̂_t (``weights: given``), the order mergekit uses: a
positive weight does not change which entries a trim keeps, and trimming the unweighted τ_t
avoids the equal magnitudes that rounding w·τ can create at the threshold.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from primerge.methods.base import (MethodParams, Normalize, PerTaskFraction, TensorContext, merge_method,
                                   scale_field, task_values)
from primerge.methods.rescale import l1_rescaled
from primerge.methods.stack import TaskStack

Rounding = Literal["nearest", "floor"]


class TiesParams(MethodParams):
    density: PerTaskFraction = Field(0.2, description="fraction of entries kept per task (one, or one per model)")
    scale: float = scale_field(1.0, "λ applied to the merged update (alias: alpha)")
    trim_scope: Literal["tensor", "model"] = Field(
        "tensor", description="rank magnitudes within each tensor or over the whole model"
    )
    normalize: Normalize = Field("count", description="divide the agreeing entries' sum by their count (paper), "
                                 "their models' weights (mergekit normalize: true) or nothing (normalize: false)")
    rounding: Rounding = Field("nearest", description="entries kept: nearest integer to density·N, all tied at "
                               "the threshold (paper), or exactly ⌊density·N⌋, at least 1, ties as torch.argsort "
                               "orders them (mergekit)")
    rescale: Literal["none", "l1"] = Field("none", description="none (paper), or l1: trimmed τ_t rescaled to "
                                           "τ_t's L1 norm (mergekit rescale: true)")


def kept_count(density: float, n: int, rounding: Rounding = "nearest") -> int:
    """How many of n entries a density keeps: round(density·n), or with ``floor`` mergekit's
    max(1, ⌊density·n⌋) for a density in (0, 1) (all for density ≥ 1, none for 0)."""
    if rounding == "nearest":
        return round(density * n)
    if density <= 0.0:
        return 0
    return n if density >= 1.0 else max(1, math.floor(density * n))


def tensor_thresholds(taus: Tensor, density: float | list[float]) -> Tensor:
    """Per-task magnitude thresholds keeping the top ``round(density_t · N)`` of N entries
    (``density`` one value, or a list of one per task).

    Returns shape (T,): the k-th largest |τ_t| (``inf`` when k = 0, so nothing is kept).
    One task at a time, so the temporaries are the size of one task vector.
    """
    flat = taus.reshape(taus.shape[0], -1)
    n = flat.shape[1]
    densities = density if isinstance(density, list) else [density] * flat.shape[0]
    out = torch.full((flat.shape[0],), math.inf, dtype=taus.dtype, device=taus.device)
    for t, row in enumerate(flat):
        k = kept_count(densities[t], n)
        if k > 0:
            out[t] = row.abs().kthvalue(n - k + 1).values
    return out


def top_k_kept(taus: Tensor, density: list[float]) -> Tensor:
    """Each τ_t with exactly its max(1, ⌊density_t·N⌋) largest |entries| kept, the rest zeroed
    (mergekit's magnitude trim): entries of equal magnitude at the cut are taken in the order
    ``torch.argsort`` gives them, as mergekit takes them (``rounding: floor``)."""
    flat = taus.reshape(taus.shape[0], -1)
    out = torch.zeros_like(flat)
    for t, row in enumerate(flat):
        keep = torch.argsort(row.abs(), descending=True)[:kept_count(density[t], row.numel(), "floor")]
        out[t, keep] = row[keep]
    return out.reshape(taus.shape)


def ties_merge(taus: Tensor, thresholds: Tensor, scale: float = 1.0, normalize: Normalize = "count",
               weights: Tensor | None = None) -> Tensor:
    """Trim with per-task ``thresholds`` (keep |τ_t| ≥ thr_t), weight, elect signs, disjoint mean, scale.

    With τ̂_t = w_t τ_t · [|τ_t| ≥ thr_t] (w_t = 1 without ``weights``): γ = sign(Σ_t τ̂_t),
    agree_t = [sign(τ̂_t) = γ], and τ = λ Σ_t agree_t τ̂_t / D with D = max(1, Σ_t agree_t)
    (``count``), Σ_t agree_t w_t (``weights``; 1 where it is 0), or 1 (``none``). Where γ = 0 only
    zero τ̂_t agree, so the update is 0 there whatever D. Tasks are visited one at a time (two
    passes), so the temporaries are a few tensors of one task's size, not T of them.
    """
    def trimmed(t: int) -> Tensor:
        kept = torch.where(taus[t].abs() >= thresholds[t], taus[t], 0.0)
        return kept if weights is None else kept * weights[t]

    elected = torch.zeros_like(taus[0])
    for t in range(taus.shape[0]):
        elected += trimmed(t)
    elected.sign_()
    total = torch.zeros_like(elected)
    divisor = torch.zeros_like(elected)
    for t in range(taus.shape[0]):
        kept = trimmed(t)
        agree = torch.sign(kept) == elected
        total += torch.where(agree, kept, 0.0)
        divisor += agree if normalize != "weights" else agree * weights[t]
    if normalize == "none":
        return scale * total
    return scale * total / torch.where(divisor == 0, 1.0, divisor)


def disjoint_mean(taus: Tensor, scale: float = 1.0, normalize: Normalize = "count",
                  weights: Tensor | None = None) -> Tensor:
    """Sign election and disjoint mean with nothing trimmed (:func:`ties_merge` at zero thresholds),
    times λ: the combine step DELLA, DRM and DARE-TIES share with TIES."""
    zero = torch.zeros(taus.shape[0], dtype=taus.dtype, device=taus.device)
    return ties_merge(taus, zero, scale, normalize, weights)


class ModelTrimPrepass:
    """Exact whole-model top-k magnitude threshold per task, in two streaming passes.

    Pass 0 counts, per task, the nonzero |τ_t| entries of every tensor in log-spaced bins
    (``BINS_PER_OCTAVE`` per power of two) and finds the bin that holds the k-th largest value,
    k = :func:`kept_count` (density_t, N_t) over all N_t entries. Pass 1 counts every distinct value
    inside that bin and selects the exact k-th largest from the counts. Memory is bounded whatever the
    magnitudes: τ is float32, and a bin (1/64 of an octave) holds at most 2^23/64 = 2^17 distinct
    float32 values, so a task's pass-1 statistic is at most 2^17 (value, count) pairs (2 MiB) even
    when every magnitude of the model falls into one bin; never the model. Both statistics reduce
    exactly (integer counts; distinct values with summed counts), so any split of the model into
    units gives the same thresholds.
    """

    BINS_PER_OCTAVE = 64
    LOW_EXPONENT = -150  # below the smallest float32 subnormal
    HIGH_EXPONENT = 129  # above the largest float32
    passes = 2

    def __init__(self, density: float | list[float], rounding: Rounding = "nearest") -> None:
        self.density = density
        self.rounding = rounding
        self.bins = (self.HIGH_EXPONENT - self.LOW_EXPONENT) * self.BINS_PER_OCTAVE
        self.target_bin: list[int | None] = []
        self.needed: list[int] = []
        self.thresholds: Tensor | None = None

    def _bin_index(self, magnitudes: Tensor) -> Tensor:
        scaled = (torch.log2(magnitudes) - self.LOW_EXPONENT) * self.BINS_PER_OCTAVE
        return scaled.floor().long().clamp_(0, self.bins - 1)

    def observe(self, pass_index: int, taus: TaskStack, ctx: TensorContext):
        """Pass 0: (per-task bin counts (T, bins), entry counts (T,)); pass 1: {task: (distinct values
        in its bin, ascending; their counts)}."""
        flat = taus.dense().reshape(taus.T, -1)
        counts = torch.zeros(taus.T, self.bins, dtype=torch.long)
        in_bin = {}
        for t in range(taus.T):  # one task at a time: float64 copies of one row only
            row = flat[t].abs().double().cpu()
            nonzero = row[row > 0]
            idx = self._bin_index(nonzero)
            if pass_index == 0:
                counts[t] = torch.bincount(idx, minlength=self.bins)
            elif self.target_bin[t] is not None:
                in_bin[t] = torch.unique(nonzero[idx == self.target_bin[t]], return_counts=True)
        if pass_index == 0:
            return counts, torch.full((taus.T,), flat.shape[1], dtype=torch.long)
        return in_bin

    @staticmethod
    def _merged(first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Two (distinct values, counts) tallies as one."""
        values, where = torch.unique(torch.cat([first[0], second[0]]), return_inverse=True)
        counts = torch.zeros(values.shape[0], dtype=torch.long).index_add_(0, where, torch.cat([first[1], second[1]]))
        return values, counts

    def combine(self, first, second):
        if isinstance(first, dict):
            return {t: self._merged(first[t], second[t]) if t in first and t in second else first.get(t, second.get(t))
                    for t in first.keys() | second.keys()}
        return first[0] + second[0], first[1] + second[1]

    def end_pass(self, pass_index: int, total) -> None:
        if total is None:
            self.thresholds = torch.empty(0)
        elif pass_index == 0:
            self._find_bins(*total)
        else:
            for t, b in enumerate(self.target_bin):
                if b is not None:  # the largest value v with #{entries of the bin >= v} >= needed
                    values, counts = total[t]
                    from_top = counts.flip(0).cumsum(0)
                    self.thresholds[t] = values.flip(0)[int((from_top < self.needed[t]).sum())]

    def _find_bins(self, counts: Tensor, sizes: Tensor) -> None:
        """The bin holding each task's k-th largest magnitude, and how many of that bin to keep."""
        self.thresholds = torch.zeros(counts.shape[0], dtype=torch.float64)
        for t, row in enumerate(counts):
            self.target_bin.append(None)
            self.needed.append(0)
            density = self.density[t] if isinstance(self.density, list) else self.density
            k = kept_count(density, int(sizes[t]), self.rounding)
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
    return ModelTrimPrepass(params.density, params.rounding) if params.trim_scope == "model" else None


def trimmed_at(taus: Tensor, thresholds: Tensor) -> Tensor:
    """Each τ_t with the entries below its threshold zeroed (T-sized: only for the L1 rescale)."""
    return torch.where(taus.abs() >= thresholds.reshape(-1, *(1,) * (taus.dim() - 1)), taus, 0.0)


@merge_method("ties", TiesParams, "TIES: trim to top-density magnitudes, elect signs, disjoint mean "
              "(mergekit's variant: normalize: weights, rounding: floor)", family="elementwise", prepass=make_prepass,
              weights="given")
def merge(taus: TaskStack, ctx: TensorContext, params: TiesParams) -> Tensor:
    """TIES merge of one tensor; thresholds from the model-wide pre-pass when declared."""
    dense = taus.dense()
    density = task_values(params.density, taus.T, "density")
    nothing = torch.zeros(taus.T, dtype=dense.dtype, device=dense.device)
    kept = dense
    if params.trim_scope == "model":
        thresholds = ctx.prepass.to(device=dense.device, dtype=dense.dtype)
    elif params.rounding == "floor":
        kept, thresholds = top_k_kept(dense, density), nothing
    else:
        thresholds = tensor_thresholds(dense, density)
    if params.rescale == "l1":
        kept, thresholds = l1_rescaled(trimmed_at(kept, thresholds), dense), nothing
    return ties_merge(kept, thresholds, params.scale, params.normalize, taus.weight_vector())
