"""Task Singular Vectors merging, TSV-M (Gargiulo et al. 2025).

Per matrix parameter with T tasks and r_full = min(m, n): keep k = ⌊r_full/T⌋
singular triplets of every task vector, concatenate them task by task
(U_s = [U_1 | … | U_T], Σ_s, V_s), decorrelate the bases with the orthonormal
polar factor (Whitening) and rebuild τ = α · Û Σ_s V̂ᵀ. Non-matrix parameters
take α times the mean. PRIME (methods/prime.py) reuses :func:`concat_factors` and
:func:`whiten` for its principal part.

Task vectors arrive as a :class:`primerge.methods.stack.TaskStack`: LoRA task vectors keep
their factors, and their top-k triplets come from the factored thin SVD (O((m + n) k²) each)
instead of an SVD of the m × n delta. Null triplets (σ = 0: a task of rank below k) are zero
columns of U_s and V_s and of the whitened bases, so they contribute nothing.

Under ``svd: auto`` a 16-bit output lets block Krylov triplets be certified
(:mod:`primerge.linalg.certificate`): the update is the SUM of the T whitened principal parts,
so each task's backward error reaches it with gain |α| and the T share the allowance
(:func:`summed_parts`, also PRIME's).
"""

from __future__ import annotations

from torch import Tensor

from primerge.linalg import SVD, live_polar
from primerge.linalg.certificate import Combination, combined
from primerge.methods.base import SVDParams, TensorContext, merge_method
from primerge.methods.stack import TaskStack


class TSVParams(SVDParams):
    """TSV has only the shared α and SVD mode."""


def concat_factors(factors: SVD) -> SVD:
    """Concatenate per-task factors (T, m, k), (T, k), (T, n, k) into task blocks.

    Returns U_s (m, T·k), Σ_s (T·k,), V_s (n, T·k) with task t in columns t·k..(t+1)·k−1
    (PRIME Algorithm 1, "PRIME-Merging"; TSV Eq. 4).
    """
    T, m, k = factors.U.shape
    n = factors.V.shape[1]
    return SVD(
        factors.U.permute(1, 0, 2).reshape(m, T * k),
        factors.S.reshape(T * k),
        factors.V.permute(1, 0, 2).reshape(n, T * k),
    )


def whiten(stacked: SVD) -> tuple[Tensor, Tensor]:
    """(Û, V̂) = (Whitening(U_s), Whitening(V_s)) with Whitening the polar factor
    (:func:`primerge.linalg.polar`); Û has orthonormal columns (PRIME Algorithm 1). Null
    triplets (σ = 0) are zero columns of Û and V̂ (:func:`primerge.linalg.live_polar`)."""
    return live_polar(stacked.U, stacked.S), live_polar(stacked.V, stacked.S)


def whitened_merge(stacked: SVD) -> Tensor:
    """Û Σ_s V̂ᵀ: the concatenated factors whitened and rebuilt (TSV Eq. 4; PRIME's M_p)."""
    U_hat, V_hat = whiten(stacked)
    return (U_hat * stacked.S) @ V_hat.mT


def summed_parts(tasks: int, scale: float) -> Combination:
    """How T tasks' truncated SVDs reach α Û Σ_s V̂ᵀ, the sum of their whitened principal parts
    (TSV Eq. 4; PRIME's M_p): gain |α| each, the T sharing the allowance (certificate docstring, 3)."""
    return Combination(tasks, abs(scale))


def tsv_svds(shape: tuple[int, int], tasks: int, params: TSVParams, prepass: None = None) -> list[tuple[tuple[int, ...], int]]:
    """TSV's one truncated SVD: the T task vectors at rank ⌊r_full/T⌋ (none when that is 0)."""
    k = min(shape) // tasks
    return [((tasks, *shape), k)] if k > 0 else []


@merge_method("tsv", TSVParams, "TSV-M: ⌊r/T⌋ singular directions per task, whitened and summed",
              svd_requests=tsv_svds)
def merge(taus: TaskStack, ctx: TensorContext, params: TSVParams) -> Tensor:
    """α Û Σ_s V̂ᵀ with ⌊r_full/T⌋ directions per task.

    [decision] When T > r_full (k = 0, e.g. a (1, n) matrix and two tasks) there is
    no rank to share, and the parameter takes the fallback α · mean.
    """
    k = min(taus.shape[-2:]) // taus.shape[0]
    if k == 0:
        return params.scale * taus.mean()
    precision = combined(ctx.precision, summed_parts(taus.T, params.scale))
    factors = taus.truncated_svd(k, mode=params.svd, seed=ctx.seed, precision=precision)
    return params.scale * whitened_merge(concat_factors(factors))
