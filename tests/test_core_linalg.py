"""Properties of the shared linear algebra (primerge.linalg)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from primerge.linalg import (
    SVD,
    energy_rank,
    flatten_spectrum,
    polar,
    project_out,
    stable_rank,
    svd,
    block_krylov_svd,
    choose_svd,
    truncated_svd,
)


def task_vector_like(m: int, n: int, seed: int, decay: float = 0.97, batch: tuple = ()) -> torch.Tensor:
    """A matrix with a realistic task-vector spectrum: a few strong directions, a decaying tail."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64)).Q
    s = decay ** torch.arange(k, dtype=torch.float64)
    s[:4] *= torch.tensor([12.0, 8.0, 6.0, 4.0], dtype=torch.float64)[: min(4, k)]
    return ((U * s) @ V.mT).float()


def subspace_sine(A: torch.Tensor, B: torch.Tensor) -> float:
    """Sine of the largest principal angle between the column spans of orthonormal A and B."""
    cosines = torch.linalg.svdvals(A.double().mT @ B.double())
    return math.sqrt(max(0.0, 1.0 - float(cosines.min()) ** 2))


def test_exact_svd_reconstructs_and_is_orthonormal():
    x = task_vector_like(40, 25, 0)
    f = svd(x)
    assert torch.allclose(f.reconstruct(), x, atol=1e-5)
    assert torch.allclose(f.U.mT @ f.U, torch.eye(25), atol=1e-5)
    assert torch.allclose(f.V.mT @ f.V, torch.eye(25), atol=1e-5)
    assert bool((f.S[:-1] >= f.S[1:]).all())


@pytest.mark.parametrize("shape", [(384, 384), (1536, 384), (384, 1536)])
def test_randomized_truncated_svd_matches_exact_on_task_vector_spectra(shape):
    x = task_vector_like(*shape, seed=1)
    r = 4  # PRIME's 1% of 384
    assert choose_svd(shape, r).mode == "randomized"
    approx = truncated_svd(x, r, mode="randomized", seed=7)
    exact = truncated_svd(x, r, mode="exact")
    assert approx.U.shape == (shape[0], r) and approx.V.shape == (shape[1], r)
    rel_sv = (approx.S - exact.S).abs().max() / exact.S[0]
    assert rel_sv < 1e-4
    assert subspace_sine(approx.U, exact.U) < 1e-2
    assert subspace_sine(approx.V, exact.V) < 1e-2
    rec = (approx.reconstruct() - exact.reconstruct()).norm() / exact.reconstruct().norm()
    assert rec < 2.5e-3


def test_randomized_svd_is_seeded_and_batched():
    x = task_vector_like(200, 120, 2, batch=(3,))
    a = truncated_svd(x, 3, mode="randomized", seed=5)
    b = truncated_svd(x, 3, mode="randomized", seed=5)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.V, b.V)
    for t in range(3):  # each batch member equals its own exact top-3 spectrum
        exact = torch.linalg.svdvals(x[t])[:3]
        assert torch.allclose(a.S[t], exact, rtol=1e-4)
    # the global RNG is left untouched
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    truncated_svd(x, 3, mode="randomized", seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_truncated_svd_rejects_bad_rank_and_mode():
    x = torch.randn(5, 4)
    with pytest.raises(ValueError):
        truncated_svd(x, 0)
    with pytest.raises(ValueError):
        truncated_svd(x, 5)
    with pytest.raises(ValueError):
        truncated_svd(x, 2, mode="lanczos")


def test_auto_mode_chooses_from_the_cost_model_of_the_shapes():
    assert choose_svd((40, 40), 4).mode == "exact"  # ℓ = 14: no room for 2 Krylov steps in 40
    assert choose_svd((384, 1536), 4).mode == "randomized"
    assert choose_svd((8, 768, 768), 96).mode == "exact"  # wide block: Krylov could cost more than LAPACK
    assert choose_svd((384, 1536), 4) == choose_svd((384, 1536), 4)  # a function of the shape alone
    small = torch.randn(12, 9, dtype=torch.float64)
    assert torch.allclose(truncated_svd(small, 3).S, torch.linalg.svdvals(small)[:3])


def test_auto_keeps_converged_members_and_redoes_the_others_exactly():
    """A batch of one decaying spectrum (Krylov converges) and one Gaussian matrix (flat
    Marchenko–Pastur top, no gap: the residual check fails): ``auto`` keeps the first's Ritz
    triplets and gives the second the exact SVD's bits."""
    x = torch.stack([task_vector_like(384, 768, 3), torch.randn(384, 768, generator=torch.Generator().manual_seed(4))])
    found = block_krylov_svd(x, 4, seed=1)
    assert found.converged.tolist() == [True, False]
    auto = truncated_svd(x, 4, mode="auto", seed=1)
    exact = truncated_svd(x, 4, mode="exact")
    for part, ritz, full in zip(auto, found.factors, exact):
        assert torch.equal(part[0], ritz[0]) and torch.equal(part[1], full[1])
    assert ((auto.reconstruct()[0] - exact.reconstruct()[0]).norm() / exact.reconstruct()[0].norm()) < 1e-5


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 12), k=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_polar_factor_is_orthonormal_and_closest(m, k, seed):
    k = min(k, m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q = polar(x)
    assert torch.allclose(q.mT @ q, torch.eye(k, dtype=torch.float64), atol=1e-10)
    # closest orthonormal matrix: no random orthonormal Q' is closer to X
    other = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64,
                                        generator=torch.Generator().manual_seed(seed + 1))).Q
    assert (q - x).norm() <= (other - x).norm() + 1e-9
    # symmetric positive factor: Qᵀ X is symmetric
    h = q.mT @ x
    assert torch.allclose(h, h.mT, atol=1e-9)


def test_polar_of_orthonormal_is_identity_map():
    q = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64)).Q
    assert torch.allclose(polar(q), q, atol=1e-12)


def test_project_out_equals_explicit_complement_projector():
    g = torch.Generator().manual_seed(3)
    B = torch.linalg.qr(torch.randn(30, 5, generator=g, dtype=torch.float64)).Q
    X = torch.randn(30, 7, generator=g, dtype=torch.float64)
    got = project_out(B, X)
    explicit = (torch.eye(30, dtype=torch.float64) - B @ B.mT) @ X
    assert torch.allclose(got, explicit, atol=1e-12)
    assert torch.allclose(B.mT @ got, torch.zeros(5, 7, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(project_out(B, got), got, atol=1e-12)  # idempotent


def test_flatten_spectrum_hand_cases():
    S = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumsum / sum = 0.4, 0.7, 0.9, 1.0
    assert torch.equal(flatten_spectrum(S, 0.0), torch.full((4,), 4.0))
    assert torch.equal(flatten_spectrum(S, 0.5), torch.tensor([4.0, 3.0, 3.0, 3.0]))
    assert torch.equal(flatten_spectrum(S, 0.9), torch.tensor([4.0, 3.0, 2.0, 2.0]))
    assert torch.equal(flatten_spectrum(S, 1.0), S)
    assert torch.allclose(flatten_spectrum(S, 0.0, 1.7), torch.full((4,), 6.8))
    assert torch.equal(flatten_spectrum(torch.zeros(3), 0.0), torch.zeros(3))


def test_stable_rank_and_energy_rank_hand_cases():
    A = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    assert stable_rank(torch.linalg.svdvals(A)) == pytest.approx(14 / 9)
    assert stable_rank(torch.zeros(3)) == 0.0
    S = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert energy_rank(S, 0.5) == 1
    assert energy_rank(S, 0.9) == 2
    assert energy_rank(S, 1.0) == 3
    assert energy_rank(torch.zeros(4)) == 0


def test_svd_namedtuple_reconstruct_batched():
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    f = svd(x)
    assert isinstance(f, SVD)
    assert torch.allclose(f.reconstruct(), x, atol=1e-12)


def test_null_singular_values_stay_null_in_the_lift_and_the_whitening():
    """Exactly-zero σ (null triplets zeroed by drop_null) gain nothing: flatten_spectrum keeps
    them at 0 and live_polar whitens only the live columns, as polar would on them alone."""
    from primerge.linalg import live_polar

    assert flatten_spectrum(torch.tensor([3.0, 1.0, 0.0])).tolist() == [3.0, 3.0, 0.0]
    assert flatten_spectrum(torch.tensor([4.0, 2.0, 0.0]), 0.0, 0.5).tolist() == [2.0, 2.0, 0.0]
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(12, 3, generator=g, dtype=torch.float64)
    X = torch.cat([Y, torch.zeros(12, 2, dtype=torch.float64)], dim=1)
    W = live_polar(X, torch.tensor([2.0, 1.0, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(W[:, :3], polar(Y), rtol=0, atol=1e-12)
    assert not W[:, 3:].any()
    torch.testing.assert_close(live_polar(Y, torch.ones(3)), polar(Y), rtol=0, atol=0)
