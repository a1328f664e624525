"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language
Models") and RegMean++ (Nguyen et al. 2025, "RegMean++: Enhancing Effectiveness and Generalization
of Regression Mean for Model Merging"): each linear layer's merged weight is the least-squares fit
of every model's outputs on its own task's inputs.

For a linear layer y = x Wᵀ (PyTorch layout W: out × in) with task t's inputs X_t (rows × in),
RegMean's merged weight minimises Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖²_F (RegMean Section 3, the problem for
linear models), whose closed form is Wᵀ = (Σ_t G_t)⁻¹ Σ_t G_t W_tᵀ with G_t = X_tᵀ X_t. Since
(Σ_t G_t)⁻¹ Σ_t G_t W₀ᵀ = W₀ᵀ, the update is U = W − W₀ with Uᵀ = (Σ_t G_t)⁻¹ Σ_t G_t τ_tᵀ: the method
works on task vectors like every other. For transformers the paper scales the Grams' off-diagonal
entries by α: G̃_t = α G_t + (1 − α) diag(G_t) (``off_diagonal``); α = 0 is the diagonal-weighted
mean U[:, j] = Σ_t g_tj τ_t[:, j] / Σ_t g_tj, and equal Grams give the plain mean at any α. Every
other tensor (biases, norms, embeddings) and every matrix whose layer the data did not reach is
averaged, as the paper does, times ``scale`` like the update (1 is the papers' merge).

RegMean++ (Section 3) is the same closed form; only the inputs differ: X_t of a layer in block l is
task t's data through the *merged* model's blocks < l and task t's own block l (RegMean: through
model t throughout). The data pass that gives the Grams runs above the engine
(:mod:`primerge.calibration`). [decision] G_t = X_tᵀ X_t / rows_t, as the papers' code averages:
every task weighs the same whatever its number of token rows (with equal rows, the paper's formula
up to a factor that cancels).

[decision] The solve is in float64: Σ_t G̃_t is factored (Cholesky) after scaling it to a unit
diagonal; when that fails or leaves a pivot below 1e-12 (the condition number is then above 10¹²: a
feature no task's data excites, or α = 1 with fewer token rows than features), a ridge λ·I is added
toward the mean of the task vectors, Uᵀ = (Σ_t G̃_t + λI)⁻¹ (Σ_t G̃_t τ_tᵀ + λ τ̄ᵀ), with
λ = ε·mean(diag Σ_t G̃_t) and ε the smallest of 1e-8, 1e-7, ..., 1 that passes; so a direction the
data never saw keeps the average, and equal Grams still give the mean exactly. The solve is
``torch.linalg.solve`` (LU), which :class:`primerge.util.deterministic.ThreadIndependent` runs on one
thread, so the bits do not depend on the thread count.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

from primerge.methods.base import MethodParams, TensorContext, merge_method, scale_field, scaled_mean
from primerge.methods.stack import TaskStack
from primerge.util.errors import InputError

#: A pivot of the unit-diagonal Σ_t G̃_t below this means the solve needs the ridge.
PIVOT_FLOOR = 1e-12
#: The ridge's ε = λ / mean(diag Σ_t G̃_t), tried in turn until the system is well posed.
RIDGES = tuple(10.0 ** k for k in range(-8, 1))


class RegMeanParams(MethodParams):
    off_diagonal: float = Field(0.9, ge=0.0, le=1.0, json_schema_extra={"tune": [0.5, 0.7, 0.9, 1.0]},
                                description="the papers' α: weight of the Grams' off-diagonal entries, "
                                            "αG + (1−α)diag G (0: a diagonal-weighted mean; primerge's alpha "
                                            "is scale)")
    scale: float = scale_field(1.0, "λ scaling the merged update (1: the papers' merge; aliases: alpha, lambda)")


def damped(grams: Tensor, alpha: float) -> Tensor:
    """G̃ = α G + (1 − α) diag(G) for a batch of Grams (…, n, n) (RegMean's off-diagonal scaling)."""
    diagonal = torch.diag_embed(grams.diagonal(dim1=-2, dim2=-1))
    return alpha * grams + (1.0 - alpha) * diagonal


def well_posed(A: Tensor) -> bool:
    """Whether the symmetric ``A`` has a positive diagonal and its unit-diagonal scaling factors
    with every pivot at least :data:`PIVOT_FLOOR`."""
    d = A.diagonal()
    if not bool((d > 0).all()):
        return False
    s = d.rsqrt()
    L, info = torch.linalg.cholesky_ex(A * s[:, None] * s[None, :])
    return int(info) == 0 and float(L.diagonal().min()) ** 2 >= PIVOT_FLOOR


def ridge(A: Tensor) -> float:
    """λ = 0 when ``A`` is well posed, else ε·mean(diag A) for the first ε of :data:`RIDGES` that is."""
    if well_posed(A):
        return 0.0
    scale = float(A.diagonal().mean())
    scale = scale if math.isfinite(scale) and scale > 0 else 1.0
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return next((eps * scale for eps in RIDGES if well_posed(A + eps * scale * eye)), RIDGES[-1] * scale)


def regmean_update(taus: Tensor, grams: Tensor, alpha: float) -> Tensor:
    """U (m × n, float64) with Uᵀ = (Σ_t G̃_t + λI)⁻¹ (Σ_t G̃_t τ_tᵀ + λ τ̄ᵀ) for task vectors
    ``taus`` (T, m, n) and Grams ``grams`` (T, n, n); λ from :func:`ridge` (module docstring)."""
    tau = taus.double()
    G = damped(grams.to(device=tau.device, dtype=torch.float64), alpha)
    A = G.sum(0)
    B = torch.zeros(tau.shape[2], tau.shape[1], dtype=torch.float64, device=tau.device)
    for G_t, tau_t in zip(G, tau):
        B += G_t @ tau_t.mT
    lam = ridge(A)
    if lam:
        A = A + lam * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        B = B + lam * tau.mean(0).mT
    return torch.linalg.solve(A, B).mT


def merge(taus: TaskStack, ctx: TensorContext, params: RegMeanParams) -> Tensor:
    """λ·U of :func:`regmean_update` for a matrix with Grams; the scaled mean otherwise."""
    if ctx.grams is None:
        return scaled_mean(taus, ctx, params)
    dense = taus.dense()
    T, m, n = dense.shape
    if tuple(ctx.grams.shape) != (T, n, n):
        raise InputError(f"tensor '{ctx.name}': its input Gram matrices are {list(ctx.grams.shape)}, not "
                         f"[{T}, {n}, {n}] for {T} task vectors of {m} × {n}; the calibration pass matched "
                         "another layer to it (name its linear layers' weights with matrices: REGEX).")
    return (params.scale * regmean_update(dense, ctx.grams, params.off_diagonal)).to(dense.dtype)


merge_method("regmean", RegMeanParams,
             "RegMean: each linear layer's least-squares fit of all models' outputs on their tasks' data "
             "(needs calibration: data); other tensors averaged", reads_grams="own")(merge)
merge_method("regmean_pp", RegMeanParams,
             "RegMean++: RegMean with each layer's inputs taken through the merged model's earlier layers "
             "(needs calibration: data)", reads_grams="merged")(merge)
