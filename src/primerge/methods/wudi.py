"""WUDI-Merging, "Whoever started the interference should end it" (Cheng et al., ICML 2025,
arXiv 2503.08099).

Sources: the paper's stored text as the search tool returns it (abstract, introduction and
third-party summaries of its method: the task vectors of a linear layer approximately span that
layer's inputs (its Lemma 1 and Proposition 1), so the interference of a merge can be bounded and
minimised layer by layer with Adam, without data); the optimisation itself as the authors'
code runs it (nathanielyvo/WUDI-Merging, ``vit/wudi_main.py``) and FusionBench
(``fusion_bench/method/wudi/wudi.py``). The method section's numbered equations were not in the
returned text, so equation numbers are not cited here.

Per matrix parameter with task vectors τ_i (m × n, PyTorch layout (out, in)): a row of τ_i is
approximately a combination of task i's inputs x ∈ ℝⁿ, so the output drift ‖(τ_m − τ_i) x‖ that
the merged update τ_m causes on task i is controlled by ‖(τ_m − τ_i) τ_iᵀ‖. WUDI minimises

    L(τ_m) = Σ_i ‖(τ_m − τ_i) τ_iᵀ‖_F² / ‖τ_i‖_F²

from τ_m = Σ_i τ_i with Adam (lr 1e-5, β = (0.9, 0.999), ε = 1e-8, no weight decay) for 300 steps
(the authors' code; FusionBench's config uses 400), and writes θ₀ + α τ_m with α = 1 (the paper
uses no rescaling coefficient; ``scale`` exists for tuning).

The result is not the minimiser: Adam's steps are about ``lr`` per entry, so ``steps · lr`` bounds
how far each entry moves from Σ_i τ_i. The learning rate is absolute, so the same settings act
differently on task vectors of a different scale; keep the defaults for fine-tunes whose
entries are of order 1e-4 to 1e-2, as in the paper.

**Computation.** L is quadratic, ∇L(τ_m) = 2 Σ_i (τ_m − τ_i) G_i / ‖τ_i‖², G_i = τ_iᵀ τ_i. With
D = τ_m − Σ_j τ_j (Adam starts at D = 0):

    ∇L = 2 (D G + E),  G = Σ_i G_i / ‖τ_i‖²,  E = Σ_i (Σ_{j≠i} τ_j) G_i / ‖τ_i‖²,

E computed once. A step then costs one product D G (2·m·n² flops), or D Fᵀ F through the stacked
scaled rows F (K × n, G = Fᵀ F) when that is cheaper (2K < n: LoRA task vectors, whose rows come
from a QR of their factors, K = Σ_i k_i). The authors' autograd pass costs T products of
(m × n)(n × m) and their backward per step. Adam is :func:`adam_descent`, the update rule of
``torch.optim.Adam`` (tests/test_methods_wudi_knots_core.py checks it against torch.optim.Adam
with autograd on L).

**Cost and determinism.** Per matrix: ``steps`` · 2·m·n·min(n, 2K) flops plus a one-time
4·m·n·K, and ``steps`` element-wise Adam updates of m·n entries: tens of seconds per 1024 × 1024
matrix on a CPU core (docs/benchmarks.md, "Measurements behind design decisions"). The authors run
it on a GPU (``primerge merge --device cuda``). No random
numbers are drawn and matrix products do not depend on the thread count
(:mod:`primerge.util.deterministic`), so a merge is bit-reproducible on one machine.

[decision] A task vector that is zero for a tensor (a LoRA adapter that does not touch it) adds
no term: its input subspace is empty, and 1/‖τ_i‖² is undefined. With a single non-zero task
vector, τ_m = τ_i is the minimiser and the starting point (∇L = 0), and is returned as is, so
float rounding cannot set Adam's sign-like steps off.

[decision] Non-matrix parameters (biases, norms, excluded embeddings) take α · mean_t τ_t, the
SVD family's fallback and FusionBench's choice (the authors' ViT code leaves them at θ₀).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import Tensor

from primerge.methods.base import MethodParams, TensorContext, merge_method, scale_field
from primerge.methods.stack import TaskStack

#: Adam's moment decay rates and denominator guard (torch.optim.Adam's defaults, the authors').
BETAS = (0.9, 0.999)
EPS = 1e-8


class WudiParams(MethodParams):
    scale: float = scale_field(1.0, "α scaling the merged update (the paper uses none: 1; alias: alpha)")
    steps: int = Field(300, ge=0, le=100_000, description="Adam steps per matrix (cost grows linearly)")
    lr: float = Field(1e-5, gt=0, description="Adam learning rate (absolute: entries move ≤ ~lr per step)")


@dataclass(frozen=True)
class InputRows:
    """G = Σ_i w_i F_iᵀ F_i from task i's rows F_i (k_i × n) and weights w_i = 1/‖τ_i‖_F².

    For a dense τ_i, F_i = τ_i; for a LoRA τ_i = L R with L = Q P (reduced QR), F_i = P R, whose
    Gram matrix is τ_iᵀ τ_i with k rows instead of m.
    """

    rows: list[Tensor]
    weights: list[float]

    @property
    def count(self) -> int:
        """K = Σ_i k_i, the rank bound of G."""
        return sum(r.shape[0] for r in self.rows)

    def gram(self) -> Tensor:
        """G (n × n)."""
        n = self.rows[0].shape[1]
        out = self.rows[0].new_zeros((n, n))
        for F, w in zip(self.rows, self.weights):
            out.addmm_(F.mT, F, alpha=w)
        return out

    def product(self) -> Callable[[Tensor], Tensor]:
        """X ↦ X G, through G itself or through the stacked rows √w_i F_i (K × n), whichever
        costs fewer flops (2·m·n² against 4·m·n·K)."""
        n = self.rows[0].shape[1]
        if 2 * self.count >= n:
            G = self.gram()
            return lambda X: X @ G
        F = torch.cat([math.sqrt(w) * rows for rows, w in zip(self.rows, self.weights)])
        return lambda X: (X @ F.mT) @ F


def task_rows(taus: TaskStack, t: int) -> tuple[Tensor, Tensor]:
    """Task t's τ_t (m × n) and its rows F_t with F_tᵀ F_t = τ_tᵀ τ_t (see :class:`InputRows`)."""
    if t in taus.lowrank:
        low = taus.lowrank[t]
        _, P = torch.linalg.qr(low.left)
        return low.dense(), P @ low.right
    tau = taus.dense_rows[taus.dense_index.index(t)]
    return tau, tau


def times_gram(X: Tensor, F: Tensor) -> Tensor:
    """X Fᵀ F for X (m × n) and F (k × n), in the cheaper order: (X Fᵀ) F costs 4·m·n·k flops,
    X (Fᵀ F) costs 2·k·n² + 2·m·n²."""
    m, n, k = X.shape[0], X.shape[1], F.shape[0]
    return (X @ F.mT) @ F if 2 * m * k <= k * n + m * n else X @ (F.mT @ F)


def adam_descent(gradient: Callable[[Tensor], Tensor], start: Tensor, steps: int, lr: float) -> Tensor:
    """``steps`` Adam steps (Kingma & Ba 2015, torch.optim.Adam's update rule) from ``start``.

    m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², x ← x − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε).
    """
    x, m, v = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    beta1, beta2 = BETAS
    for step in range(1, steps + 1):
        g = gradient(x)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.sqrt().div_(math.sqrt(1 - beta2**step)).add_(EPS)
        x.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
    return x


def wudi(taus: TaskStack, steps: int, lr: float) -> Tensor:
    """τ_m after ``steps`` Adam steps on L(τ_m) = Σ_i ‖(τ_m − τ_i) τ_iᵀ‖² / ‖τ_i‖², from Σ_i τ_i.

    One task at a time: its rows F_i, its weight w_i and its share w_i (Σ_{j≠i} τ_j) F_iᵀ F_i of E.
    """
    total = taus.sum()
    offset = torch.zeros_like(total)
    rows, weights = [], []
    for t in range(taus.T):
        tau, F = task_rows(taus, t)
        norm2 = float(tau.double().square().sum())
        if norm2 > 0:
            rows.append(F)
            weights.append(1.0 / norm2)
            offset.add_(times_gram(total - tau, F), alpha=weights[-1])
    if len(rows) <= 1 or steps == 0:
        return total
    product = InputRows(rows, weights).product()
    drift = adam_descent(lambda D: product(D).add_(offset).mul_(2), torch.zeros_like(total), steps, lr)
    return total + drift


@merge_method("wudi", WudiParams, "WUDI: Adam on Σ_i ‖(τ_m − τ_i) τ_iᵀ‖² / ‖τ_i‖² from Σ τ_i (data-free, per matrix)")
def merge(taus: TaskStack, ctx: TensorContext, params: WudiParams) -> Tensor:
    """α τ_m for one matrix parameter (WUDI-Merging)."""
    return params.scale * wudi(taus, params.steps, params.lr)
