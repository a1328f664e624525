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
from primerge.linalg.certificate import CERTIFIED_STEPS
from primerge.linalg.choice import MARGIN, affordable_steps, certificate_steps, exact_seconds, randomized_seconds
from primerge.linalg.krylov import FLOOR_RESIDUAL, gap_free_floor, marchenko_pastur, max_steps


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


@pytest.mark.parametrize("shape, rank", [((8, 1024, 1024), 128), ((8, 2816, 1024), 10), ((8, 256, 1024), 32),
                                         ((8, 768, 768), 96), ((3, 384, 768), 4), ((40, 40), 4)])
def test_a_16_bit_output_budgets_the_most_steps_within_the_margin(shape, rank):
    """For a 16-bit output the attempt's budget J is the largest number of steps whose modelled cost
    c(J) stays within MARGIN of the exact SVDs (c(J + 1) above it, or the basis out of room), and the
    Krylov branch is taken exactly when J ≥ CERTIFIED_STEPS; float32's choice is unchanged by it."""
    budget = affordable_steps(shape, rank)
    limit = MARGIN * exact_seconds(shape)
    if budget >= 0:
        assert randomized_seconds(shape, rank, budget) <= limit
    room = max_steps(rank, shape, limit=min(shape[-2:]))
    assert budget == room or randomized_seconds(shape, rank, budget + 1) > limit
    choice = choose_svd(shape, rank, True)
    assert (choice.mode == "randomized") == (budget >= CERTIFIED_STEPS and max_steps(rank, shape) >= CERTIFIED_STEPS)
    if choice.mode == "randomized":
        assert choice.steps == budget
    strict = choose_svd(shape, rank)
    assert strict.steps == max_steps(rank, shape)
    assert (strict.mode == "randomized") == (randomized_seconds(shape, rank, strict.steps) <= limit
                                               and strict.steps >= CERTIFIED_STEPS)


def test_marchenko_pastur_quantiles_match_the_closed_form_and_the_mean():
    """y = 1: with λ(φ) = 2(1 + cos φ) the law's mass above λ(φ) is (φ − sin φ)/π exactly, so the
    quantiles must invert it (to the 2048-point midpoint rule's O(10⁻⁶) plus the linear interpolation's
    O(h²) = 2·10⁻⁶, against a 10⁻⁴ tolerance). Any y: the law has mean 1 and support [(1 − √y)², (1 + √y)²];
    the average of 2000 quantiles at midpoint shares is the mean to O(2000^-5/3) ≈ 3·10⁻⁶ (the quantile
    function's √-type end points) plus the quadrature's, against 10⁻³."""
    for phi in (0.3, 1.0, 2.0, 2.9):
        share = (phi - math.sin(phi)) / math.pi
        (value, lowest) = marchenko_pastur(1.0, (share,))
        assert value == pytest.approx(2 * (1 + math.cos(phi)), abs=1e-4) and lowest == 0.0
    for ratio in (1.0, 0.36, 0.25):
        *values, lowest = marchenko_pastur(ratio, tuple((i + 0.5) / 2000 for i in range(2000)))
        assert sum(values) / len(values) == pytest.approx(1.0, abs=1e-3)
        assert lowest == pytest.approx((1 - math.sqrt(ratio)) ** 2)
        assert (1 + math.sqrt(ratio)) ** 2 >= values[0] >= values[-1] >= lowest
        assert all(a >= b for a, b in zip(values, values[1:]))


def test_the_gap_free_model_needs_more_steps_for_larger_demands_and_deeper_cuts():
    """n̂ = max(CERTIFIED_STEPS, 1 + ⌈ln(lead·D)/μ⌉) (choice module docstring): CERTIFIED_STEPS for a
    demand the first step already meets, one more step each time D grows by e^μ (ln 10/μ = 5.1: far
    from an integer), and, at the same first-step excess, more steps where the cut lies deeper in
    the floor (k = 128: a smaller relative gap to the (ℓ + 1)-th value, a slower rate)."""
    shape, rank = (8, 1024, 1024), 10
    floor = gap_free_floor(rank, shape)
    _, cut, block, lowest = marchenko_pastur(1.0, tuple((i - 0.5) / 1024 for i in (rank, rank + 1, rank + 11)))
    assert floor.rate == pytest.approx(math.acosh(1 + 2 * (cut - block) / (block - lowest)))
    assert floor.lead == pytest.approx(FLOOR_RESIDUAL * math.sqrt(rank * cut / 1024))
    easy = torch.tensor([0.5 / floor.lead], dtype=torch.float64)
    assert certificate_steps(shape, rank, easy).item() == CERTIFIED_STEPS
    demand = torch.tensor([10.0, 10.0 * math.exp(floor.rate)], dtype=torch.float64) / floor.lead
    first, second = certificate_steps(shape, rank, demand).tolist()
    assert first == 1 + math.ceil(math.log(10.0) / floor.rate) and second == first + 1
    deeper = certificate_steps(shape, 128, demand[:1] * floor.lead / gap_free_floor(128, shape).lead)
    assert deeper.item() > first


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
