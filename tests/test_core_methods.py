"""Methods against hand-computed cases and independent NumPy implementations.

The references below are written from docs/algorithms.md directly in NumPy float64,
sharing no code with primerge, so a mistake in primerge's shared pieces (factor
concatenation, whitening, projection, TIES) shows up as a mismatch.
"""

from __future__ import annotations

import numpy as np
import pytest
import primerge
import torch

from primerge.util.errors import RecipeError
from primerge.linalg import polar
from primerge.methods import get_method
from primerge.methods.base import TensorContext

from helpers import MATRIX, np_ties, random_taus, run, run_passes
from primerge.methods.prime import principal_rank
from primerge.methods.ties import ModelTrimPrepass, tensor_thresholds
from primerge.methods.tsv import concat_factors, whiten, whitened_merge
from primerge.linalg import truncated_svd





# ---------- NumPy references -------------------------------------------------------------

def np_polar(x: np.ndarray) -> np.ndarray:
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return p @ qt


def np_whitened(taus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, list]:
    """TSV on the top-k of each task: returns (Û, Û Σ V̂ᵀ, per-task truncated parts)."""
    us, ss, vs, parts = [], [], [], []
    for tau in taus:
        u, s, vt = np.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vt[:k].T)
        parts.append(u[:, :k] @ np.diag(s[:k]) @ vt[:k])
    U_hat = np_polar(np.concatenate(us, axis=1))
    V_hat = np_polar(np.concatenate(vs, axis=1))
    return U_hat, U_hat @ np.diag(np.concatenate(ss)) @ V_hat.T, parts


def np_prime(taus: np.ndarray, r: int, residual: str = "mean", a: float = 1.7) -> np.ndarray:
    U_hat, principal, parts = np_whitened(taus, r)
    residuals = taus - np.stack(parts)
    if residual == "mean":
        merged = residuals.mean(0)
    elif residual == "ties":
        merged = np_ties(residuals, 0.2)
    else:
        u, s, vt = np.linalg.svd(residuals.mean(0), full_matrices=False)
        merged = u @ np.diag(np.full_like(s, a * s[0])) @ vt
    p_perp = np.eye(taus.shape[1]) - U_hat @ U_hat.T
    return principal + p_perp @ merged


# ---------- Task Arithmetic -------------------------------------------------------------

def test_task_arithmetic_hand_case():
    taus = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    assert torch.equal(run("task_arithmetic", taus), torch.tensor([2.0, 1.0]))
    assert torch.equal(run("task_arithmetic", taus, scale=0.3), 0.3 * torch.tensor([4.0, 2.0]))


# ---------- TIES ------------------------------------------------------------------------

TIES_TAUS = torch.tensor([
    [1.0, -2.0, 0.5, 2.5, 3.0],   # keeps 3.0, 2.5
    [-1.5, 1.0, 0.2, 4.0, -0.1],  # keeps 4.0, -1.5
    [2.0, -0.5, -3.0, -1.0, 0.4],  # keeps -3.0, 2.0
])


def test_ties_hand_computed():
    # sums of trimmed: [0.5, 0, -3, 6.5, 3] -> signs [+, 0, -, +, +];
    # entry 0 keeps only the agreeing 2.0, entry 1 has no elected sign, entry 3 = mean(2.5, 4).
    got = run("ties", TIES_TAUS, density=0.4)
    assert torch.allclose(got, torch.tensor([2.0, 0.0, -3.0, 3.25, 3.0]))
    assert torch.allclose(run("ties", TIES_TAUS, density=0.4, scale=0.5),
                          0.5 * torch.tensor([2.0, 0.0, -3.0, 3.25, 3.0]))


def test_ties_matches_numpy_reference_on_random_tensors():
    taus = random_taus(4, 9, 7, seed=1)
    for density in (0.0, 0.2, 0.5, 1.0):
        got = run("ties", taus, density=density)
        assert np.allclose(got.numpy(), np_ties(taus.numpy(), density), atol=1e-12), density


def test_ties_thresholds_keep_exactly_k_entries():
    taus = random_taus(3, 10, 10, seed=2)
    thr = tensor_thresholds(taus, 0.2)
    kept = (taus.abs() >= thr.reshape(-1, 1, 1)).reshape(3, -1).sum(1)
    assert kept.tolist() == [20, 20, 20]
    assert torch.isinf(tensor_thresholds(taus, 0.0)).all()


def test_ties_model_scope_prepass_equals_global_kthvalue():
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randn(3, 40, 30, generator=g) * 10 ** torch.randn(3, 1, 1, generator=g),
               torch.randn(3, 30, generator=g) * 1e-3,
               torch.randn(3, 17, 5, generator=g)]
    tensors[1][0, :5] = 0.0  # zeros count in N but are never kept
    density = 0.2
    got = run_passes(ModelTrimPrepass(density), [(t, MATRIX) for t in tensors])
    everything = torch.cat([t.reshape(3, -1) for t in tensors], dim=1).abs().double()
    n = everything.shape[1]
    k = round(density * n)
    expected = everything.kthvalue(n - k + 1, dim=1).values
    assert torch.equal(got, expected)
    kept = sum(((t.reshape(3, -1).abs().double() >= got[:, None]) & (t.reshape(3, -1) != 0)).sum(1)
               for t in tensors)
    assert kept.tolist() == [k, k, k]
    ctx = TensorContext("x", "matrix", prepass=got)
    merged = get_method("ties").apply(tensors[0], ctx, get_method("ties").parameters({"trim_scope": "model"}))
    assert merged.shape == tensors[0].shape[1:]


def test_ties_model_prepass_degenerate_densities():
    for density, expect in ((0.0, float("inf")), (1.0, 0.0)):
        x = torch.tensor([[0.0, 1.0, -2.0]])
        assert run_passes(ModelTrimPrepass(density), [(x, MATRIX)]).tolist() == [expect]


# ---------- TSV -------------------------------------------------------------------------

def test_tsv_matches_numpy_reference():
    taus = random_taus(3, 12, 9, seed=5)
    got = run("tsv", taus, svd="exact")
    _, expected, _ = np_whitened(taus.numpy(), 9 // 3)
    assert np.allclose(got.numpy(), expected, atol=1e-10)
    assert torch.allclose(run("tsv", taus, svd="exact", alpha=0.5), 0.5 * got)


def test_tsv_single_task_is_identity():
    taus = random_taus(1, 8, 6, seed=6)
    assert torch.allclose(run("tsv", taus), taus[0], atol=1e-10)


def test_tsv_of_orthogonal_tasks_is_sum_of_truncations():
    # tasks living in mutually orthogonal row and column spaces: whitening changes nothing
    Q1 = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64)).Q
    # k = r_full / T = 4 directions each, all with nonzero singular values
    s1 = torch.tensor([5.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    s2 = torch.tensor([4.0, 2.5, 1.5, 0.5], dtype=torch.float64)
    t1 = Q1[:, :4] @ torch.diag(s1) @ Q2[:, :4].T
    t2 = Q1[:, 4:8] @ torch.diag(s2) @ Q2[:, 4:8].T
    got = run("tsv", torch.stack([t1, t2]))
    assert torch.allclose(got, t1 + t2, atol=1e-10)


def test_tsv_falls_back_to_mean_when_rank_cannot_be_shared():
    taus = torch.randn(3, 1, 6, dtype=torch.float64)
    assert torch.allclose(run("tsv", taus), taus.mean(0))


def test_svd_methods_use_mean_for_non_matrices():
    taus = torch.randn(3, 5, dtype=torch.float64)
    fallback = TensorContext("layer.bias", "fallback")
    for method in ("tsv", "prime"):
        assert torch.allclose(run(method, taus, fallback, alpha=2.0), 2.0 * taus.mean(0))


# ---------- PRIME -----------------------------------------------------------------------

@pytest.mark.parametrize(
    "rank,r_full,T,expected",
    [(0.01, 384, 8, 4), (0.01, 32, 3, 1), (0.125, 20, 2, 3), (0.5, 10, 3, 3),
     (2, 10, 8, 1), (20, 10, 1, 10), (1, 1, 2, 0), (0.015, 100, 2, 2)],
)
def test_principal_rank_rules(rank, r_full, T, expected):
    assert principal_rank(rank, r_full, T) == expected


@pytest.mark.parametrize("given,expected", [("5%", 0.05), (" 12.5% ", 0.125), (0.05, 0.05), (3, 3), ("auto", "auto")])
def test_prime_rank_accepts_percentages(given, expected):
    assert primerge.get_method("prime").parameters({"rank": given}).rank == expected


@pytest.mark.parametrize("given,needle", [("x%", "not a percentage such as 5%"), ("100%", "between 0% and 100%"),
                                          ("0%", "between 0% and 100%"), (1.5, "whole number")])
def test_prime_rank_refuses_unclear_values_in_words(given, needle):
    with pytest.raises(primerge.RecipeError, match=needle):
        primerge.get_method("prime").parameters({"rank": given})


@pytest.mark.parametrize("residual", ["mean", "ties", "s_sb"])
def test_prime_matches_numpy_reference(residual):
    taus = random_taus(3, 30, 20, seed=7)
    got = run("prime", taus, rank=2, residual=residual, svd="exact")
    expected = np_prime(taus.numpy(), 2, residual)
    assert np.allclose(got.numpy(), expected, atol=1e-9)


def test_prime_whitened_basis_orthonormal_and_residual_orthogonal():
    taus = random_taus(4, 40, 24, seed=8)
    r = 1  # below the tasks' rank, so the residual holds task-specific directions
    out = run("prime", taus, rank=r, svd="exact")
    factors = truncated_svd(taus, r, mode="exact")
    stacked = concat_factors(factors)
    U_hat, principal = whiten(stacked)[0], whitened_merge(stacked)
    assert torch.allclose(U_hat.mT @ U_hat, torch.eye(4 * r, dtype=torch.float64), atol=1e-10)
    residual_part = out - principal
    assert (U_hat.mT @ residual_part).abs().max() < 1e-10
    assert residual_part.norm() > 0.1 * out.norm()  # the residual really contributes


def test_prime_principal_part_equals_tsv_at_rank_r_full_over_T():
    taus = random_taus(3, 15, 12, seed=9)
    out = run("prime", taus, rank=12 // 3, svd="exact")
    tsv = run("tsv", taus, svd="exact")
    U_hat = polar(concat_factors(truncated_svd(taus, 4, mode="exact")).U)
    assert torch.allclose(U_hat @ (U_hat.mT @ out), tsv, atol=1e-10)


def test_prime_alpha_scales_everything():
    taus = random_taus(2, 10, 10, seed=10)
    assert torch.allclose(run("prime", taus, rank=1, alpha=0.4), 0.4 * run("prime", taus, rank=1))


def test_prime_randomized_path_within_1e_3_of_exact():
    g = torch.Generator().manual_seed(11)
    T, m, n = 4, 384, 1536
    taus = torch.stack([
        torch.randn(m, 6, generator=g) @ torch.randn(6, n, generator=g) + 0.05 * torch.randn(m, n, generator=g)
        for _ in range(T)
    ])
    exact = run("prime", taus, rank=0.01, svd="exact")
    fast = run("prime", taus, rank=0.01, svd="auto")
    assert ((fast - exact).norm() / exact.norm()).item() < 1e-3


def test_prime_randomized_path_within_1e_3_without_a_spectral_gap():
    # power-law spectra (σ_j ∝ j^-0.7) have no gap at r = 1%: the hard case for a sketch
    g = torch.Generator().manual_seed(13)
    T, m, n = 4, 384, 768
    s = torch.arange(1, m + 1, dtype=torch.float32) ** -0.7
    taus = torch.stack([
        (torch.linalg.qr(torch.randn(m, m, generator=g)).Q * s) @ torch.linalg.qr(torch.randn(n, m, generator=g)).Q.T
        for _ in range(T)
    ])
    exact = run("prime", taus, rank=0.01, svd="exact")
    fast = run("prime", taus, rank=0.01, svd="randomized")
    assert ((fast - exact).norm() / exact.norm()).item() < 1e-3


def test_prime_parameter_validation():
    spec = get_method("prime")
    with pytest.raises(RecipeError, match="whole number"):
        spec.parameters({"rank": 2.5})
    with pytest.raises(RecipeError, match="rank"):
        spec.parameters({"rank": "best"})
    with pytest.raises(RecipeError, match="greater than 0"):
        spec.parameters({"rank": -1})
    assert spec.parameters({"rank": "auto"}).rank == "auto"
    with pytest.raises(RecipeError, match="Did you mean 'residual'"):
        spec.parameters({"residul": "mean"})
    with pytest.raises(RecipeError, match="residual"):
        spec.parameters({"residual": "median"})


@pytest.mark.parametrize("method", [s.name for s in primerge.list_methods() if "scale" in s.params_model.model_fields])
def test_alpha_is_the_documented_alias_of_scale(method):
    """One name per concept: every method's multiplier of the merged update is ``scale``; ``alpha``
    (the SVD papers' α) sets the same field, and giving both is refused."""
    spec = primerge.get_method(method)
    assert spec.parameters({"alpha": 0.3}).scale == spec.parameters({"scale": 0.3}).scale == 0.3
    with pytest.raises(primerge.RecipeError, match="name the same field"):
        spec.parameters({"alpha": 0.3, "scale": 0.3})
