"""HO-GSVD, the alignment matrix and Higher-Order Subspace Boosting."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import run
from primerge.methods.ho_gsvd import alignment_matrix, ho_boost, ho_gsvd, shared_side_gsvd

F64 = torch.float64


def constructed(N=3, m=8, n=6, seed=0):
    """A_i = W_i diag(s_i) Vᵀ: directions 0-2 common (same σ in every matrix), direction 3+i in A_i only."""
    g = torch.Generator().manual_seed(seed)
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    mats = []
    for i in range(N):
        W, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=F64))
        s = torch.zeros(n, dtype=F64)
        s[:3] = torch.tensor([3.0, 2.0, 1.5], dtype=F64)
        s[3 + i] = 2.5
        mats.append(W @ torch.diag(s) @ V.T)
    return torch.stack(mats), V


def test_common_directions_have_equal_values_and_unique_ones_are_isolated():
    A, V = constructed()
    dec = ho_gsvd(A)
    assert torch.allclose(dec.reconstruct(), A, atol=1e-12)
    match = (dec.V.T @ V).abs()  # component k vs true direction j
    true_of = match.argmax(1)
    assert torch.allclose(match.max(1).values, torch.ones(6, dtype=F64), atol=1e-8)
    assert sorted(true_of.tolist()) == list(range(6))
    for k, j in enumerate(true_of.tolist()):
        values = dec.S[:, k]
        if j < 3:  # common: equal generalized singular values, the true σ
            assert torch.allclose(values, torch.full((3,), [3.0, 2.0, 1.5][j], dtype=F64), atol=1e-10)
        else:  # isolated: present in matrix j - 3 only
            owner = j - 3
            assert values[owner] == pytest.approx(2.5, abs=1e-10)
            others = torch.cat([values[:owner], values[owner + 1:]])
            assert float(others.abs().max()) < 1e-10
    # eigenvalues of T: 1/(1/N + π) for common, (1/N)((N-1)/π + 1/(1+π)) for isolated
    pi, N = 1e-2, 3
    lam = dec.eigenvalues[true_of.argsort()]
    assert torch.allclose(lam[:3], torch.full((3,), 1 / (1 / N + pi), dtype=F64), rtol=1e-8)
    assert torch.allclose(lam[3:], torch.full((3,), ((N - 1) / pi + 1 / (1 + pi)) / N, dtype=F64), rtol=1e-8)


def test_random_and_wide_matrices_reconstruct():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, 10, 7, generator=g, dtype=F64)
    assert torch.allclose(ho_gsvd(A).reconstruct(), A, atol=1e-10)
    wide = torch.randn(3, 5, 9, generator=g, dtype=F64)
    dec, transposed = shared_side_gsvd(wide)
    assert transposed and dec.V.shape == (5, 5)
    assert torch.allclose(dec.reconstruct().mT, wide, atol=1e-10)


def test_alignment_hand_case():
    layer1 = torch.tensor([[1.0, 2.0], [1.0, 0.5]])
    layer2 = torch.tensor([[3.0], [3.0]])
    A = alignment_matrix([layer1, layer2], eps=0.0)
    # layer 1: (|log 1| + |log 4|)/2 = log 2; layer 2: 0; mean over layers: log(2)/2
    expected = torch.tensor([[0.0, math.log(2) / 2], [math.log(2) / 2, 0.0]], dtype=F64)
    assert torch.allclose(A, expected, atol=1e-12)
    # ε keeps zeros finite
    assert torch.isfinite(alignment_matrix([torch.tensor([[0.0], [1.0]])])).all()


def test_ho_boost_single_task_identity_and_flat_spectrum():
    g = torch.Generator().manual_seed(2)
    tau = torch.randn(1, 12, 9, generator=g, dtype=F64)
    assert torch.allclose(ho_boost(tau, beta=1.0, scale=1.0), tau[0], atol=1e-10)
    taus = torch.randn(4, 10, 10, generator=g, dtype=F64)
    s = torch.linalg.svdvals(ho_boost(taus))  # β = 0: every value lifted to the largest
    assert torch.allclose(s, s[0].expand_as(s), rtol=1e-8)


def test_registered_method_shapes_and_fallback():
    g = torch.Generator().manual_seed(3)
    taus = torch.randn(3, 6, 14, generator=g)
    out = run("ho_subspace_boosting", taus)
    assert out.shape == (6, 14) and torch.isfinite(out).all()
    from primerge.methods.base import TensorContext

    bias = torch.randn(3, 6, generator=g)
    fb = run("ho_subspace_boosting", bias, TensorContext("b", "fallback"))
    assert torch.allclose(fb, bias.mean(0), atol=1e-6)
