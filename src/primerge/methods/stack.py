"""Task vectors of one matrix parameter, some of them kept as low-rank factors.

A LoRA fine-tune's task vector is τ_t = s·B A: rank k ≪ min(m, n) by construction. The engine
hands methods that declare ``factored=True`` (:class:`primerge.methods.base.MethodSpec`) a
:class:`TaskStack` in which such task vectors stay as their factors τ_t = L_t R_t
(L_t: m × k, R_t: k × n); every other task vector is a dense m × n matrix. The stack answers
what the SVD methods ask of their task vectors:

- :meth:`TaskStack.truncated_svd`: top-r triplets per task. Dense rows go through
  :func:`primerge.linalg.truncated_svd`; factored rows through
  :func:`primerge.linalg.factored_svd` (QR of L and Rᵀ, SVD of the k × k core, O((m + n) k²)),
  zero-padded when r > k. Null triplets are zeroed in both (:func:`primerge.linalg.drop_null`),
  so the result does not depend on how a task vector was given.
- :meth:`TaskStack.mean`, :meth:`TaskStack.sum_svd`: Σ_t τ_t accumulated one task at a time
  (the sum of low-rank tasks stays low-rank: [L_1 … L_T][R_1; …; R_T]).
- :meth:`TaskStack.dense`: the plain (T, m, n) float32 stack, for everything else.

``shape`` mimics a tensor's ``(T, m, n)``, so a method's shape arithmetic works on both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from primerge.linalg import SVD, SVDMode, drop_null, factored_svd, fit_rank, svd, truncated_svd


@dataclass(frozen=True)
class LowRank:
    """τ = L R with ``left`` L (m, k) and ``right`` R (k, n); k = 0 is the zero task vector."""

    left: Tensor
    right: Tensor

    def dense(self) -> Tensor:
        """L R as an m × n matrix."""
        return self.left @ self.right

    def add_to(self, out: Tensor, scale: float = 1.0) -> Tensor:
        """out += scale · L R, in place (one m × n accumulator, no temporary)."""
        return out.addmm_(self.left, self.right, alpha=scale)


class TaskStack:
    """T task vectors of one parameter: ``dense`` rows (D, m, n) at ``dense_index``, and
    ``lowrank`` rows {t: :class:`LowRank`}; together they are tasks 0..T−1."""

    def __init__(self, dense: Tensor, dense_index: list[int], lowrank: dict[int, LowRank]):
        self.dense_rows = dense
        self.dense_index = list(dense_index)
        self.lowrank = dict(lowrank)
        self.T = len(self.dense_index) + len(self.lowrank)
        if sorted([*self.dense_index, *self.lowrank]) != list(range(self.T)):
            raise ValueError("dense and low-rank rows must number the tasks 0..T-1 exactly once")
        self.matrix_shape = tuple(dense.shape[1:])
        self.dtype = dense.dtype
        self.device = dense.device

    @classmethod
    def of(cls, taus: Tensor | TaskStack) -> TaskStack:
        """A stack from a dense (T, m, n) tensor (no copy), or the stack itself."""
        if isinstance(taus, TaskStack):
            return taus
        return cls(taus, list(range(taus.shape[0])), {})

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.T, *self.matrix_shape))

    @property
    def factored(self) -> bool:
        """Whether any task vector is held as factors."""
        return bool(self.lowrank)

    def dense(self) -> Tensor:
        """The (T, m, n) stack; the dense block itself when no task is factored."""
        if not self.lowrank:
            return self.dense_rows
        out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        out[self.dense_index] = self.dense_rows
        for t, f in self.lowrank.items():
            f.add_to(out[t])
        return out

    def sum(self) -> Tensor:
        """Σ_t τ_t (m × n), accumulated task by task."""
        out = self.dense_rows.sum(0)
        for f in self.lowrank.values():
            f.add_to(out)
        return out

    def mean(self) -> Tensor:
        """(1/T) Σ_t τ_t."""
        return self.sum() / self.T

    def truncated_svd(self, rank: int, *, mode: SVDMode = "auto", seed: int = 0) -> SVD:
        """Top-``rank`` triplets of every task, batched (T, m, rank), (T, rank), (T, n, rank).

        Null triplets are zeroed (:func:`primerge.linalg.drop_null`); a factored task of rank
        k < ``rank`` gets ``rank − k`` zero triplets (:func:`primerge.linalg.fit_rank`).
        """
        m, n = self.matrix_shape
        U = self.dense_rows.new_zeros((self.T, m, rank))
        S = self.dense_rows.new_zeros((self.T, rank))
        V = self.dense_rows.new_zeros((self.T, n, rank))
        if self.dense_index:
            f = drop_null(truncated_svd(self.dense_rows, rank, mode=mode, seed=seed), self.shape)
            U[self.dense_index], S[self.dense_index], V[self.dense_index] = f
        for t, low in self.lowrank.items():
            f = fit_rank(drop_null(factored_svd(low.left, low.right), self.shape), rank)
            U[t], S[t], V[t] = f
        return SVD(U, S, V)

    def sum_svd(self) -> SVD:
        """Thin SVD of Σ_t τ_t with null triplets zeroed: from the concatenated factors
        [L_1 … L_T][R_1; …; R_T] when every task is factored, else from the dense sum."""
        if self.dense_index:
            total = self.sum()
            return drop_null(svd(total), total.shape)
        left = torch.cat([f.left for f in self.lowrank.values()], dim=-1)
        right = torch.cat([f.right for f in self.lowrank.values()], dim=-2)
        return drop_null(factored_svd(left, right), self.matrix_shape)


def as_dense(taus: Tensor | TaskStack) -> Tensor:
    """The dense (T, *shape) task vectors of a tensor or a stack."""
    return taus.dense() if isinstance(taus, TaskStack) else taus
