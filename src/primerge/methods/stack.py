"""The task vectors of one parameter, as every method receives them: a :class:`TaskStack`.

The T task vectors τ_1..τ_T of one tensor come in one of three forms, all behind this one type:

- **dense** rows, a float32 block (D, *shape) (full fine-tunes; any task vector once materialised);
- **low-rank** rows τ_t = L_t R_t (:class:`LowRank`; L_t: m × k, R_t: k × n), how a LoRA fine-tune's
  τ_t = s·B A arrives for a matrix parameter — never formed as an m × n matrix unless asked;
- **summed**: only Σ_t τ_t, accumulated one model at a time by the stream for merge functions
  marked :func:`primerge.methods.base.reads_sum` (Task Arithmetic, the SVD methods' mean), so
  that memory does not grow with T.

A method asks the stack for what it needs:

- :meth:`TaskStack.dense`: the (T, *shape) float32 tensor (element-wise methods). A dense-only
  stack returns its own block, no copy;
- :meth:`TaskStack.sum`, :meth:`TaskStack.mean`: Σ_t τ_t and (1/T) Σ_t τ_t, task by task;
- :meth:`TaskStack.truncated_svd`: top-r triplets per task — dense rows through
  :func:`primerge.linalg.truncated_svd`, low-rank rows through :func:`primerge.linalg.factored_svd`
  (QR of L and Rᵀ, SVD of the k × k core, O((m + n) k²)); null triplets are zeroed in both
  (:func:`primerge.linalg.drop_null`), so the result does not depend on how τ_t was given;
- :meth:`TaskStack.sum_svd`: the thin SVD of Σ_t τ_t, from the concatenated factors
  [L_1 … L_T][R_1; …; R_T] when every task is low-rank.

``shape`` is the tensor-like (T, *shape), so shape arithmetic reads the same as on a tensor.
``weights`` are the models' weights w_t (all 1 unless the recipe sets them): already applied to
the rows, or left to the method (:class:`~primerge.methods.base.MethodSpec` ``weights``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from primerge.linalg import (
    SVD,
    OutputPrecision,
    SVDMode,
    drop_null,
    factored_svd,
    fit_rank,
    record,
    svd,
    truncated_svd,
)


@dataclass(frozen=True)
class LowRank:
    """τ = L R with ``left`` L (m, k) and ``right`` R (k, n); k = 0 is the zero task vector."""

    left: Tensor
    right: Tensor

    @classmethod
    def zero(cls, shape: tuple[int, int], device: torch.device) -> LowRank:
        """The zero m × n task vector as factors of rank 0."""
        m, n = shape
        return cls(torch.zeros((m, 0), device=device), torch.zeros((0, n), device=device))

    def scaled(self, weight: float) -> LowRank:
        """w·τ = (w L) R."""
        return LowRank(self.left * weight, self.right)

    def dense(self) -> Tensor:
        """L R as an m × n matrix."""
        return self.left @ self.right

    def add_to(self, out: Tensor) -> Tensor:
        """out += L R, in place (one m × n accumulator, no temporary)."""
        return out.addmm_(self.left, self.right)


class TaskStack:
    """T task vectors of one parameter: ``dense`` rows (D, *shape) at ``dense_index`` and
    ``lowrank`` rows {t: :class:`LowRank`}, together tasks 0..T−1; or only their sum
    (:meth:`of_sum`). ``weights``: the models' weights w_t (default all 1)."""

    def __init__(self, dense: Tensor, dense_index: list[int], lowrank: dict[int, LowRank],
                 weights: tuple[float, ...] | None = None):
        self.dense_rows = dense
        self.dense_index = list(dense_index)
        self.lowrank = dict(lowrank)
        self.T = len(self.dense_index) + len(self.lowrank)
        if sorted([*self.dense_index, *self.lowrank]) != list(range(self.T)):
            raise ValueError("dense and low-rank rows must number the tasks 0..T-1 exactly once")
        self.tensor_shape = tuple(dense.shape[1:])
        self.dtype = dense.dtype
        self.device = dense.device
        self._total: Tensor | None = None
        self.weights = self._checked_weights(weights)

    def _checked_weights(self, weights: tuple[float, ...] | None) -> tuple[float, ...]:
        if weights is None:
            return (1.0,) * self.T
        if len(weights) != self.T:
            raise ValueError(f"{len(weights)} weights for {self.T} task vectors")
        return tuple(weights)

    @classmethod
    def of(cls, taus: Tensor | TaskStack, weights: tuple[float, ...] | None = None) -> TaskStack:
        """A stack of dense task vectors (T, *shape) (no copy), or the stack itself."""
        if isinstance(taus, TaskStack):
            return taus
        return cls(taus, list(range(taus.shape[0])), {}, weights)

    @classmethod
    def of_sum(cls, total: Tensor, tasks: int, weights: tuple[float, ...] | None = None) -> TaskStack:
        """A stack known only through Σ_t τ_t of ``tasks`` task vectors (:meth:`dense` refuses)."""
        stack = cls(total.new_empty((0, *total.shape)), [], {})
        stack.T, stack._total = tasks, total
        stack.weights = stack._checked_weights(weights)
        return stack

    def weight_vector(self) -> Tensor:
        """The models' weights w_t as a (T,) tensor in the stack's dtype and device."""
        return torch.tensor(self.weights, dtype=self.dtype, device=self.device)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.T, *self.tensor_shape))

    @property
    def factored(self) -> bool:
        """Whether any task vector is held as factors."""
        return bool(self.lowrank)

    @property
    def summed(self) -> bool:
        """Whether only the sum Σ_t τ_t is known (:meth:`of_sum`)."""
        return self._total is not None

    def dense(self) -> Tensor:
        """The (T, *shape) float32 task vectors; the dense block itself when no task is factored."""
        if self.summed:
            raise TypeError("this stack holds only Σ_t τ_t; a merge marked reads_sum must use sum()/mean()")
        if not self.lowrank:
            return self.dense_rows
        out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        out[self.dense_index] = self.dense_rows
        for t, f in self.lowrank.items():
            f.add_to(out[t])
        return out

    def sum(self) -> Tensor:
        """Σ_t τ_t, accumulated task by task."""
        if self.summed:
            return self._total
        out = self.dense_rows.sum(0)
        for f in self.lowrank.values():
            f.add_to(out)
        return out

    def mean(self) -> Tensor:
        """(1/T) Σ_t τ_t."""
        return self.sum() / self.T

    def truncated_svd(self, rank: int, *, mode: SVDMode = "auto", seed: int = 0,
                      precision: OutputPrecision | None = None, exact: SVD | None = None) -> SVD:
        """Top-``rank`` triplets of every task, batched (T, m, rank), (T, rank), (T, n, rank).

        Null triplets are zeroed (:func:`primerge.linalg.drop_null`); a factored task of rank
        k < ``rank`` gets ``rank − k`` zero triplets (:func:`primerge.linalg.fit_rank`).
        ``precision``: how finely the merge is written (``svd: auto``'s certificate); ``exact``: the
        dense rows' exact top-r₀ triplets (r₀ ≥ ``rank``) when an earlier pass computed them.
        """
        m, n = self.tensor_shape
        U = self.dense_rows.new_zeros((self.T, m, rank))
        S = self.dense_rows.new_zeros((self.T, rank))
        V = self.dense_rows.new_zeros((self.T, n, rank))
        if self.dense_index:
            found = truncated_svd(self.dense_rows, rank, mode=mode, seed=seed, precision=precision, exact=exact)
            f = drop_null(found, self.shape)
            U[self.dense_index], S[self.dense_index], V[self.dense_index] = f
        for t, low in self.lowrank.items():
            f = fit_rank(drop_null(factored_svd(low.left, low.right), self.shape), rank)
            U[t], S[t], V[t] = f
        record("factored", "low-rank task vectors (LoRA)", len(self.lowrank))
        return SVD(U, S, V)

    def sum_svd(self) -> SVD:
        """Thin SVD of Σ_t τ_t with null triplets zeroed: from the concatenated factors
        [L_1 … L_T][R_1; …; R_T] when every task is factored, else from the dense sum."""
        if self.dense_index or self.summed:
            total = self.sum()
            return drop_null(svd(total), total.shape)
        left = torch.cat([f.left for f in self.lowrank.values()], dim=-1)
        right = torch.cat([f.right for f in self.lowrank.values()], dim=-2)
        return drop_null(factored_svd(left, right), self.tensor_shape)

    def subset(self, tasks: int) -> TaskStack:
        """The stack of the first ``tasks`` task vectors (e.g. to merge 1..T models in analysis)."""
        if self.summed:
            raise TypeError("a stack known only through its sum has no subsets")
        keep = [i for i, t in enumerate(self.dense_index) if t < tasks]
        return TaskStack(self.dense_rows[keep] if len(keep) < len(self.dense_index) else self.dense_rows,
                         [self.dense_index[i] for i in keep],
                         {t: f for t, f in self.lowrank.items() if t < tasks}, self.weights[:tasks])
