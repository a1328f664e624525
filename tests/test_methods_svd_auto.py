"""``svd: auto`` stays within 1e-4 relative of each SVD method's exact path on spectra without a
gap (issue 18), and gives the same bytes on every repeat and thread count.

The spectra are the hard case for a randomized SVD: a slow power law σ_j ∝ j^-0.5 and Gaussian
matrices (the flat Marchenko–Pastur top). Each case runs twice: with ``auto``'s own choice
(:func:`primerge.linalg.choose_svd`) and with the randomized attempt forced on every truncated
SVD (``MAX_STEPS`` steps), so the residual check and the exact fallback of the members that fail it
are exercised whatever the cost model picks for these shapes.
"""

from __future__ import annotations

import pytest
import torch

from primerge.util.deterministic import ThreadIndependent
from primerge.linalg import SVDChoice
from primerge.linalg import truncated as truncated_module
from primerge.linalg.krylov import MAX_STEPS

from helpers import on_thread_counts, run

T, M, N = 4, 384, 768
TRUNCATING = {"tsv": {}, "prime": {"rank": 0.01}, "iso_c": {}, "iso_cts": {}}
EXACT_ONLY = {"subspace_boosting": {}, "drm": {}, "ho_subspace_boosting": {}}


def power_law(seed: int, power: float = 0.5) -> torch.Tensor:
    """T float32 task vectors, each U diag(j^-power) Vᵀ with its own random orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    s = torch.arange(1, M + 1, dtype=torch.float64) ** -power
    U = torch.linalg.qr(torch.randn(T, M, M, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(T, N, M, generator=g, dtype=torch.float64)).Q
    return ((U * s.unsqueeze(-2)) @ V.mT).float()


def gaussian(seed: int) -> torch.Tensor:
    return torch.randn(T, M, N, generator=torch.Generator().manual_seed(seed)) / M**0.5


SPECTRA = {"power-law": lambda: power_law(21), "gaussian": lambda: gaussian(22)}


@pytest.fixture(params=["chosen", "forced"])
def attempt(request, monkeypatch):
    """``auto`` as it chooses, or with the block Krylov attempt forced for every shape."""
    if request.param == "forced":
        monkeypatch.setattr(truncated_module, "choose_svd",
                            lambda shape, rank, tolerant=False: SVDChoice("randomized", 0.0, 0.0, MAX_STEPS,
                                                                          "forced by the test"))
    return request.param


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("method", TRUNCATING)
def test_auto_within_1e_4_of_exact_without_a_spectral_gap(method, spectrum, attempt):
    taus = SPECTRA[spectrum]()
    with ThreadIndependent():
        exact = run(method, taus, svd="exact", **TRUNCATING[method])
        auto = run(method, taus, svd="auto", **TRUNCATING[method])
    assert relative(auto, exact) < 1e-4


@pytest.mark.parametrize("method", EXACT_ONLY)
def test_methods_without_a_truncated_svd_always_take_the_exact_one(method, monkeypatch):
    """Subspace Boosting, DRM and HO-SB decompose with the exact SVD only (no ``svd`` parameter):
    their one path is the exact one, so ``auto`` cannot move them. The randomized SVD is made to
    fail here to prove it is never reached."""
    def never(*args, **kwargs):
        raise AssertionError(f"{method} reached the randomized SVD")

    monkeypatch.setattr(truncated_module, "block_krylov_svd", never)
    taus = power_law(23)
    with ThreadIndependent():
        assert torch.isfinite(run(method, taus, **EXACT_ONLY[method])).all()
    with pytest.raises(Exception, match="svd"):
        run(method, taus, svd="auto")


@pytest.mark.parametrize("method", TRUNCATING)
def test_auto_gives_the_same_bytes_on_repeats_and_thread_counts(method, attempt):
    taus = torch.cat([power_law(24)[:2], gaussian(25)[:2]])  # some members converge, some fall back
    outputs = on_thread_counts(lambda: run(method, taus, svd="auto", **TRUNCATING[method]))
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])
