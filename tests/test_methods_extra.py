"""DARE, DELLA, Breadcrumbs, Consensus, Iso-C/CTS, Subspace Boosting and DRM against hand cases
and independent NumPy float64 references written from docs/algorithms.md.

The references share no code with primerge. The random methods (DARE, DELLA) are checked by
feeding the reference the same uniform draws (one CPU ``torch.Generator`` seeded with the
tensor's seed, as documented in ``primerge.methods.dare.uniform_draws``); everything else about
them is recomputed in NumPy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from primerge.util.errors import RecipeError
from primerge.methods import get_method
from primerge.methods.base import TensorContext

from helpers import MATRIX, np_elect_disjoint_mean, np_ties, random_taus, run
from primerge.methods.consensus import tall_masks
from primerge.methods.dare import drop_and_rescale
from primerge.methods.della import keep_probabilities, magprune
from primerge.methods.drm import joint_prune, joint_space
from primerge.methods.iso import iso_cts_ranks
from primerge.methods.fused import fused_qkv_axis
from primerge.methods.ties import ModelTrimPrepass

BIAS = TensorContext("layer.bias", "fallback", seed=5)




def draws(shape, seed: int) -> np.ndarray:
    """The uniform draws DARE and DELLA use for a float64 tensor with this seed."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()


# ---------- NumPy references -------------------------------------------------------------



def np_rows(taus: np.ndarray) -> np.ndarray:
    return taus.reshape(len(taus), 1, -1) if taus.ndim <= 2 else taus.reshape(len(taus), taus.shape[1], -1)


def np_della(taus: np.ndarray, density: float, eps: float, u: np.ndarray, lam: float = 1.0) -> np.ndarray:
    rows = np_rows(taus)
    n = rows.shape[-1]
    out = np.zeros_like(rows)
    for t in range(rows.shape[0]):
        for i in range(rows.shape[1]):
            row = rows[t, i]
            rank = np.empty(n)
            rank[np.argsort(np.abs(row), kind="stable")] = np.arange(n)
            p = (density - eps) + 2 * eps * rank / (n - 1)
            keep = u[t, i] < p
            out[t, i, keep] = row[keep] / p[keep]
    return lam * np_elect_disjoint_mean(out.reshape(taus.shape))


def np_breadcrumbs(taus: np.ndarray, gamma: float, density: float, scale: float) -> np.ndarray:
    rows = np_rows(taus)
    n = rows.shape[-1]
    top = int(np.floor(gamma * n + 0.5))
    keep = min(int(np.floor(density * n + 0.5)), n - top)
    out = np.zeros_like(rows)
    for t in range(rows.shape[0]):
        for i in range(rows.shape[1]):
            order = np.argsort(-np.abs(rows[t, i]), kind="stable")
            chosen = order[top:top + keep]
            out[t, i, chosen] = rows[t, i, chosen]
    return scale * out.reshape(taus.shape).sum(0)


def np_consensus(taus: np.ndarray, lam, k: int, scale: float) -> np.ndarray:
    total = taus.sum(0)
    lam = np.broadcast_to(np.asarray(lam, dtype=float), (len(taus),))
    votes = sum((np.abs(tau) >= l * np.abs(total - tau)).astype(int) for tau, l in zip(taus, lam))
    return scale * np.where(votes >= k, total, 0.0)


def np_polar(x: np.ndarray) -> np.ndarray:
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return p @ qt


def np_iso_cts(taus: np.ndarray, ratio: float = 0.8) -> np.ndarray:
    T = len(taus)
    r = min(taus.shape[1:])
    k_c = int(ratio * r)
    t_tot = round((r - k_c) / T) * T
    k_c, n = r - t_tot, t_tot // T
    u, s, vt = np.linalg.svd(taus.sum(0), full_matrices=False)
    uc, sc, vc = u[:, :k_c], s[:k_c], vt[:k_c].T
    us, ss, vs = [], [], []
    for tau in taus:
        w = tau - uc @ (uc.T @ tau)
        ut, st, vtt = np.linalg.svd(w, full_matrices=False)
        us.append(ut[:, :n]), ss.append(st[:n]), vs.append(vtt[:n].T)
    U = np_polar(np.concatenate(us + [uc], axis=1))
    V = np_polar(np.concatenate(vs + [vc], axis=1))
    return np.concatenate(ss + [sc]).mean() * U @ V.T


def np_boost(m: np.ndarray, beta: float) -> np.ndarray:
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    c = np.cumsum(s) / s.sum()
    hits = np.nonzero(c >= beta)[0]
    i = hits[0] if len(hits) else len(s) - 1
    return u @ np.diag(np.maximum(s, s[i])) @ vt


def np_drm_h(taus: np.ndarray, density: float = 0.2, lam: float = 1.0, tol: float = 1e-2) -> np.ndarray:
    T, m, n = taus.shape
    u, s, vt = np.linalg.svd(np.concatenate(list(taus), axis=1), full_matrices=False)
    k = int((s > tol * s[0]).sum())
    u, s, vt = u[:, :k], s[:k], vt[:k]
    blocks = [vt[:, t * n:(t + 1) * n] for t in range(T)]           # V_tᵀ, k × n
    norms = [np.linalg.norm(b, axis=1) for b in blocks]
    unit = np.stack([b / nr[:, None] for b, nr in zip(blocks, norms)])
    flat = np.abs(unit).ravel()
    kept = int(round(density * flat.size))
    thr = np.sort(flat)[::-1][kept - 1]
    pruned = np.where(np.abs(unit) >= thr, unit, 0.0)
    scaled = np.stack([(s * nr)[:, None] * p for nr, p in zip(norms, pruned)])
    return u @ (lam * np_elect_disjoint_mean(scaled))


def np_drm_v(taus: np.ndarray, density: float = 0.2) -> np.ndarray:
    """DRM-V written directly on the vertical stack, with U split into task blocks."""
    T, m, n = taus.shape
    u, s, vt = np.linalg.svd(np.concatenate(list(taus), axis=0), full_matrices=False)
    k = int((s > 1e-2 * s[0]).sum())
    u, s, vt = u[:, :k], s[:k], vt[:k]
    blocks = [u[t * m:(t + 1) * m] for t in range(T)]               # U_t, m × k
    norms = [np.linalg.norm(b, axis=0) for b in blocks]
    unit = np.stack([b / nr[None, :] for b, nr in zip(blocks, norms)])
    flat = np.abs(unit).ravel()
    thr = np.sort(flat)[::-1][int(round(density * flat.size)) - 1]
    pruned = np.where(np.abs(unit) >= thr, unit, 0.0)
    scaled = np.stack([p * (s * nr)[None, :] for nr, p in zip(norms, pruned)])
    return np_elect_disjoint_mean(scaled) @ vt


# ---------- DARE ------------------------------------------------------------------------

def test_dare_with_no_drop_equals_its_base_merge_exactly():
    taus = random_taus(3, 9, 7, seed=1)
    assert torch.equal(run("dare", taus, drop_rate=0.0), run("task_arithmetic", taus))
    assert torch.equal(run("dare", taus, drop_rate=0.0, scale=0.3), run("task_arithmetic", taus, scale=0.3))
    assert torch.equal(run("dare", taus, drop_rate=0.0, combine="ties", ties_density=0.2),
                       run("ties", taus, density=0.2))


def test_dare_drops_fraction_p_and_rescales_survivors():
    taus = torch.randn(2, 300, 300, generator=torch.Generator().manual_seed(2)).double()
    dropped = drop_and_rescale(taus, 0.8, seed=7)
    kept = dropped != 0
    assert abs(1 - kept.double().mean().item() - 0.8) < 0.005
    assert torch.allclose(dropped[kept], taus[kept] / 0.2, rtol=0, atol=1e-12)


def test_dare_preserves_the_expectation_of_task_arithmetic():
    taus = random_taus(3, 6, 5, seed=5)
    N = 2000
    mean = sum(run("dare", taus, TensorContext("w", "matrix", seed=s)) for s in range(N)) / N
    ta = run("task_arithmetic", taus)
    # each rescaled entry has variance τ²·p/(1−p) = 4τ²; the mean over N seeds of (1/T)Σ_t
    std = torch.sqrt(4 * taus.square().sum(0) / taus.shape[0] ** 2 / N)
    assert ((mean - ta).abs() <= 5 * std + 1e-12).all()


@pytest.mark.parametrize("combine", ["linear", "ties"])
def test_dare_matches_numpy_reference(combine):
    taus = random_taus(3, 8, 6, seed=6)
    u = draws(taus.shape, MATRIX.seed)
    dropped = np.where(u >= 0.7, taus.numpy() / 0.3, 0.0)
    if combine == "linear":
        expected = 0.5 * dropped.sum(0)
        got = run("dare", taus, drop_rate=0.7, scale=0.5)
    else:
        expected = 1.5 * np_ties(dropped, 0.5)
        got = run("dare", taus, drop_rate=0.7, combine="ties", ties_density=0.5, scale=1.5)
    assert np.allclose(got.numpy(), expected, atol=1e-12)
    default = run("dare", taus)
    assert np.allclose(default.numpy(), np.where(u >= 0.8, taus.numpy() / 0.2, 0).sum(0) / 3, atol=1e-12)


def test_dare_parameter_validation():
    spec = get_method("dare")
    for bad in ({"drop_rate": 1.0}, {"drop_rate": -0.1}, {"combine": "mean"}, {"ties_density": 2},
                {"drop": 0.5}):
        with pytest.raises(RecipeError):
            spec.parameters(bad)
    assert spec.parameters({}).drop_rate == 0.8


# ---------- DELLA -----------------------------------------------------------------------

def test_della_keep_probabilities_span_density_plus_minus_epsilon():
    row = torch.tensor([[[0.5, -3.0, 0.1, 2.0, -1.0]]], dtype=torch.float64)
    p = keep_probabilities(row, 0.4, 0.2)
    # ranks by |value| ascending: 0.1→0, 0.5→1, -1→2, 2→3, -3→4
    assert torch.allclose(p, torch.tensor([[[0.3, 0.6, 0.2, 0.5, 0.4]]], dtype=torch.float64))
    assert abs(p.mean().item() - 0.4) < 1e-12


def test_della_without_randomness_is_ties_without_trim():
    taus = random_taus(3, 7, 6, seed=7)
    assert torch.allclose(run("della", taus, density=1.0, epsilon=0.0), run("ties", taus, density=1.0))


def test_della_keeps_density_on_average_and_favours_large_magnitudes():
    taus = torch.randn(2, 200, 400, generator=torch.Generator().manual_seed(8)).double()
    pruned = magprune(taus, 0.2, 0.1, seed=9)
    kept = pruned != 0
    assert abs(kept.double().mean().item() - 0.2) < 0.005
    big = taus.abs() > taus.abs().median()
    assert kept[big].double().mean() > kept[~big].double().mean() + 0.05
    p = keep_probabilities(taus.reshape(2, 200, 400), 0.2, 0.1)
    assert torch.allclose(pruned[kept], taus[kept] / p[kept])


@pytest.mark.parametrize("shape", [(3, 6, 9), (3, 11), (3, 2, 3, 4)])
def test_della_matches_numpy_reference(shape):
    taus = torch.randn(shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    ctx = TensorContext("t", "matrix" if len(shape) == 3 else "fallback", seed=21)
    got = run("della", taus, ctx, density=0.4, epsilon=0.15, scale=0.8)
    expected = np_della(taus.numpy(), 0.4, 0.15, draws(np_rows(taus.numpy()).shape, 21), 0.8)
    assert np.allclose(got.numpy(), expected, atol=1e-12)


def test_della_parameter_validation():
    spec = get_method("della")
    for bad in ({"epsilon": 0.3}, {"density": 0.0}, {"density": 0.9, "epsilon": 0.2},
                {"epsilon": -0.1}, {"lambda": 1.0}):
        with pytest.raises(RecipeError):
            spec.parameters(bad)
    params = spec.parameters({})
    assert (params.density, params.epsilon, params.scale) == (0.2, 0.1, 1.0)


# ---------- Breadcrumbs -----------------------------------------------------------------

def test_breadcrumbs_hand_case():
    # one row of 10: drop the top 1 (|−9|), keep the next 5 (8, −7, 6, 5, −4), drop the rest
    t1 = torch.tensor([1.0, -9.0, 8.0, -7.0, 6.0, 5.0, -4.0, 3.0, 2.0, 0.5])
    t2 = torch.zeros(10)
    got = run("breadcrumbs", torch.stack([t1, t2]), BIAS, gamma=0.1, density=0.5, scale=1.0)
    assert torch.equal(got, torch.tensor([0.0, 0.0, 8.0, -7.0, 6.0, 5.0, -4.0, 0.0, 0.0, 0.0]))
    halved = run("breadcrumbs", torch.stack([t1, t2]), BIAS, gamma=0.1, density=0.5)
    assert torch.equal(halved, got / 2)  # α defaults to 1/T


def test_breadcrumbs_masks_each_row_of_a_matrix():
    taus = random_taus(3, 8, 20, seed=12)
    got = run("breadcrumbs", taus, gamma=0.05, density=0.6, scale=0.7)
    assert np.allclose(got.numpy(), np_breadcrumbs(taus.numpy(), 0.05, 0.6, 0.7), atol=1e-12)
    default = run("breadcrumbs", taus)
    assert np.allclose(default.numpy(), np_breadcrumbs(taus.numpy(), 0.01, 0.9, 1 / 3), atol=1e-12)


def test_breadcrumbs_parameter_validation():
    spec = get_method("breadcrumbs")
    for bad in ({"gamma": 0.2, "density": 0.9}, {"gamma": -0.01}, {"density": 1.1}, {"beta": 0.1}):
        with pytest.raises(RecipeError):
            spec.parameters(bad)


# ---------- Consensus (TALL masks) ------------------------------------------------------

def test_consensus_keeps_exactly_the_entries_with_k_votes():
    taus = torch.tensor([
        [1.0, 1.0, 5.0, 0.0, -2.0],
        [1.0, 0.0, 0.1, 0.0, 2.0],
        [1.0, 0.0, 0.1, 3.0, 1.0],
    ])
    # sums τ_MTL = [3, 1, 5.2, 3, 1]. λ = 1: m_t = |τ_t| ≥ |τ_MTL − τ_t|
    # entry 0: 1 ≥ 2 for no task -> 0 votes; entry 1: task 0 (1 ≥ 0) -> 1; entry 2: task 0 -> 1;
    # entry 3: task 2 (3 ≥ 0) -> 1; entry 4: task 1 (2 ≥ 1), task 2 (1 ≥ 0), not task 0 (2 ≥ 3) -> 2
    assert tall_masks(taus, 1.0).sum(0).tolist() == [0, 1, 1, 1, 2]
    got = run("consensus", taus, BIAS, lam=1.0, k=2, scale=1.0)
    assert torch.equal(got, torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))
    # λ = 0.4: entry 0: 1 ≥ 0.8 for every task -> 3; entry 2: 0.1 ≥ 0.4·5.1 fails -> 1; entry 4 -> 3
    assert tall_masks(taus, 0.4).sum(0).tolist() == [3, 1, 1, 1, 3]
    got = run("consensus", taus, BIAS, lam=0.4, k=2, scale=1.0)
    assert torch.equal(got, torch.tensor([3.0, 0.0, 0.0, 0.0, 1.0]))
    got = run("consensus", taus, BIAS, lam=0.4, k=1, scale=1.0)
    assert torch.allclose(got, torch.tensor([3.0, 1.0, 5.2, 3.0, 1.0]))
    assert torch.equal(run("consensus", taus, BIAS, lam=0.4, k=3, scale=1.0), torch.tensor([3.0, 0, 0, 0, 1]))
    # per-task λ: task 0 alone gets λ = 3 -> it loses its votes on entries 0 and 4 (1 ≥ 6, 2 ≥ 9)
    assert tall_masks(taus, [3.0, 0.4, 0.4]).sum(0).tolist() == [2, 1, 1, 1, 2]
    assert torch.equal(run("consensus", taus, BIAS, lam=0.0, k=3, scale=0.5), 0.5 * taus.sum(0))


def test_consensus_matches_numpy_reference():
    taus = random_taus(4, 9, 8, seed=13)
    got = run("consensus", taus, lam=[0.2, 0.3, 0.5, 0.6], k=2, scale=0.5)
    assert np.allclose(got.numpy(), np_consensus(taus.numpy(), [0.2, 0.3, 0.5, 0.6], 2, 0.5), atol=1e-12)
    default = run("consensus", taus)
    assert np.allclose(default.numpy(), np_consensus(taus.numpy(), 0.4, 2, 0.25), atol=1e-12)


def test_consensus_parameter_validation():
    spec = get_method("consensus")
    for bad in ({"k": 0}, {"lam": -0.1}, {"lam": []}, {"lam": [0.3, -1]}, {"votes": 2}):
        with pytest.raises(RecipeError):
            spec.parameters(bad)
    with pytest.raises(RecipeError, match="layer.weight"):
        run("consensus", random_taus(3, 4, 4), lam=[0.3, 0.4])


# ---------- Iso-C / Iso-CTS -------------------------------------------------------------

def test_iso_c_has_a_flat_spectrum_at_the_mean_singular_value():
    taus = random_taus(3, 12, 9, seed=14)
    got = run("iso_c", taus)
    s_sum = np.linalg.svd(taus.sum(0).numpy(), compute_uv=False)
    s_out = np.linalg.svd(got.numpy(), compute_uv=False)
    assert np.allclose(s_out, s_sum.mean(), atol=1e-10)
    u, s, vt = np.linalg.svd(taus.sum(0).numpy(), full_matrices=False)
    assert np.allclose(got.numpy(), s.mean() * u @ vt, atol=1e-10)
    assert torch.allclose(run("iso_c", taus, alpha=0.5), 0.5 * got)


@pytest.mark.parametrize(
    "r_full,T,expected",
    [(100, 8, (84, 2)), (768, 8, (616, 19)), (10, 3, (7, 1)), (10, 8, (10, 0)), (1, 1, (0, 1)),
     (20, 2, (16, 2))],
)
def test_iso_cts_rank_split(r_full, T, expected):
    k_c, n = iso_cts_ranks(r_full, T, 0.8)
    assert (k_c, n) == expected and k_c + T * n == r_full


@pytest.mark.parametrize("shape", [(3, 20, 14), (2, 9, 25)])
def test_iso_cts_matches_numpy_reference_and_is_flat(shape):
    taus = random_taus(*shape, seed=15)
    got = run("iso_cts", taus, svd="exact")
    expected = np_iso_cts(taus.numpy())
    assert np.allclose(got.numpy(), expected, atol=1e-9)
    s_out = np.linalg.svd(got.numpy(), compute_uv=False)
    assert np.allclose(s_out, s_out[0], atol=1e-9)


def test_iso_cts_without_task_budget_is_iso_c():
    taus = random_taus(8, 10, 10, seed=16)  # (10 − 8)/8 rounds to 0: everything is common
    assert torch.allclose(run("iso_cts", taus, svd="exact"), run("iso_c", taus), atol=1e-10)


def test_iso_fallback_and_validation():
    taus = torch.randn(3, 5, dtype=torch.float64)
    for method in ("iso_c", "iso_cts"):
        assert torch.allclose(run(method, taus, BIAS, alpha=2.0), 2.0 * taus.mean(0))
    spec = get_method("iso_cts")
    for bad in ({"common_ratio": 1.5}, {"common_ratio": -0.1}, {"svd": "fast"}, {"ratio": 0.8}):
        with pytest.raises(RecipeError):
            spec.parameters(bad)
    with pytest.raises(RecipeError):
        get_method("iso_c").parameters({"common_ratio": 0.8})


# ---------- Subspace Boosting -----------------------------------------------------------

def test_subspace_boosting_beta_one_is_the_base_merge():
    taus = random_taus(3, 12, 8, seed=17)
    for base in ("task_arithmetic", "ties", "consensus"):
        got = run("subspace_boosting", taus, base_merge=base, beta=1.0)
        assert torch.allclose(got, run(base, taus), atol=1e-10), base


def test_subspace_boosting_beta_zero_raises_every_value_to_sigma_one():
    taus = random_taus(3, 12, 8, seed=18)
    got = run("subspace_boosting", taus)
    ta = run("task_arithmetic", taus).numpy()
    s_out = np.linalg.svd(got.numpy(), compute_uv=False)
    assert np.allclose(s_out, np.linalg.svd(ta, compute_uv=False)[0], atol=1e-10)
    assert np.allclose(got.numpy(), np_boost(ta, 0.0), atol=1e-10)


def test_subspace_boosting_matches_numpy_reference():
    taus = random_taus(4, 10, 16, seed=19)
    got = run("subspace_boosting", taus, base_merge="ties", base_params={"density": 0.3}, beta=0.4, alpha=0.7)
    expected = 0.7 * np_boost(np_ties(taus.numpy(), 0.3), 0.4)
    assert np.allclose(got.numpy(), expected, atol=1e-10)


def test_subspace_boosting_fused_qkv_per_slice():
    taus = random_taus(2, 18, 6, seed=20)
    ctx = TensorContext("encoder.layer.0.attn.qkv.weight", "matrix", seed=1)
    got = run("subspace_boosting", taus, ctx)
    ta = run("task_arithmetic", taus).numpy()
    expected = np.concatenate([np_boost(ta[i:i + 6], 0.0) for i in (0, 6, 12)], axis=0)
    assert np.allclose(got.numpy(), expected, atol=1e-10)
    assert not np.allclose(got.numpy(), np_boost(ta, 0.0), atol=1e-3)
    whole = run("subspace_boosting", taus, ctx, split_qkv=False)
    assert np.allclose(whole.numpy(), np_boost(ta, 0.0), atol=1e-10)
    # GPT-2's Conv1D c_attn stores (in, 3·out): split along the second axis
    wide = random_taus(2, 5, 15, seed=21)
    got = run("subspace_boosting", wide, TensorContext("h.0.attn.c_attn.weight", "matrix"))
    ta = run("task_arithmetic", wide).numpy()
    expected = np.concatenate([np_boost(ta[:, i:i + 5], 0.0) for i in (0, 5, 10)], axis=1)
    assert np.allclose(got.numpy(), expected, atol=1e-10)
    assert fused_qkv_axis("attn.in_proj_weight", (96, 32), r"qkv|in_proj|c_attn") == 0
    assert fused_qkv_axis("mlp.fc1.weight", (96, 32), r"qkv|in_proj|c_attn") is None
    assert fused_qkv_axis("attn.qkv.weight", (90, 32), r"qkv|in_proj|c_attn") is None


def test_subspace_boosting_leaves_non_matrices_unboosted():
    taus = torch.randn(3, 4, 4, dtype=torch.float64)
    ctx = TensorContext("embeddings.word_embeddings.weight", "fallback")
    got = run("subspace_boosting", taus, ctx, base_merge="ties", alpha=2.0)
    assert torch.allclose(got, 2.0 * run("ties", taus, ctx))


def test_subspace_boosting_prepass_and_validation():
    spec = get_method("subspace_boosting")
    params = spec.parameters({"base_merge": "ties", "base_params": {"trim_scope": "model"}})
    assert isinstance(spec.make_prepass(params), ModelTrimPrepass)
    assert spec.make_prepass(spec.parameters({})) is None
    for bad in ({"base_merge": "prime"}, {"base_merge": "ties", "base_params": {"density": 2}},
                {"base_params": {"densty": 0.2}}, {"beta": 1.5}, {"qkv_pattern": "(qkv"}):
        with pytest.raises(RecipeError):
            spec.parameters(bad)


# ---------- DRM -------------------------------------------------------------------------

def test_drm_joint_space_rows_are_unit_and_reconstruct_the_deltas():
    taus = random_taus(3, 10, 7, seed=22)
    space = joint_space(taus, rank_tol=0.0)
    norms = space.blocks.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-12)
    rebuilt = space.U @ (space.scales.unsqueeze(-1) * space.blocks)
    assert torch.allclose(rebuilt, taus, atol=1e-10)


def test_drm_joint_prune_keeps_the_top_fraction_over_all_tasks():
    blocks = joint_space(random_taus(4, 12, 9, seed=23)).blocks
    keep = joint_prune(blocks, 0.2)
    assert keep.sum().item() == round(0.2 * blocks.numel())
    assert blocks[keep].abs().min() > blocks[~keep].abs().max()
    per_task = keep.reshape(4, -1).sum(1)
    assert per_task.sum() == keep.sum() and len(set(per_task.tolist())) > 1  # joint, not per task


def test_drm_rank_tolerance_drops_tiny_directions():
    g = torch.Generator().manual_seed(24)
    low = torch.randn(2, 8, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 2, 6, generator=g, dtype=torch.float64)
    taus = low + 1e-6 * torch.randn(2, 8, 6, generator=g, dtype=torch.float64)
    assert joint_space(taus).U.shape[1] <= 4  # the stack has rank ≤ 4 above the noise


@pytest.mark.parametrize("shape", [(3, 6, 5), (2, 4, 9)])
def test_drm_matches_numpy_reference(shape):
    taus = random_taus(*shape, seed=25)
    got_h = run("drm", taus)
    assert np.allclose(got_h.numpy(), np_drm_h(taus.numpy()), atol=1e-10)
    got_v = run("drm", taus, variant="V", density=0.3)
    assert np.allclose(got_v.numpy(), np_drm_v(taus.numpy(), 0.3), atol=1e-10)
    assert torch.allclose(run("drm", taus, density=0.5, scale=1.3),
                          torch.from_numpy(np_drm_h(taus.numpy(), 0.5, 1.3)), atol=1e-10)


def test_drm_hand_case_orthogonal_rank_one_tasks():
    # Δ_1 = 2·e1 a1ᵀ, Δ_2 = 3·e2 a2ᵀ with unit a's: the joint SVD separates them and
    # keeping everything (density 1) returns Δ_1 + Δ_2 (disjoint supports, one task each).
    a1 = torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64)
    a2 = torch.tensor([0.0, 0.6, -0.8], dtype=torch.float64)
    e1, e2 = torch.eye(4, dtype=torch.float64)[:2]
    taus = torch.stack([2 * torch.outer(e1, a1), 3 * torch.outer(e2, a2)])
    assert torch.allclose(run("drm", taus, density=1.0), taus.sum(0), atol=1e-12)
    assert torch.allclose(run("drm", taus, density=1.0, variant="V"), taus.sum(0), atol=1e-12)


def test_drm_non_matrices_get_sign_election_and_disjoint_mean():
    taus = torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, 0.0], [-1.0, -4.0, 5.0]])
    # signs of sums: +, −, +; means of agreeing: (1+3)/2, (−2−4)/2, 5
    assert torch.allclose(run("drm", taus, BIAS), torch.tensor([2.0, -3.0, 5.0]))
    assert torch.allclose(run("drm", taus, BIAS, scale=0.5), torch.tensor([1.0, -1.5, 2.5]))


def test_drm_split_qkv():
    taus = random_taus(2, 12, 4, seed=26)
    ctx = TensorContext("attn.qkv.weight", "matrix")
    got = run("drm", taus, ctx, split_qkv=True)
    thirds = [run("drm", taus[:, i:i + 4]) for i in (0, 4, 8)]
    assert torch.allclose(got, torch.cat(thirds, dim=0))
    assert torch.allclose(run("drm", taus, ctx), run("drm", taus))  # off by default
    wide = random_taus(2, 3, 9, seed=27)  # Conv1D c_attn layout (in, 3·out): thirds of the columns
    got = run("drm", wide, TensorContext("h.0.attn.c_attn.weight", "matrix"), split_qkv=True)
    assert torch.allclose(got, torch.cat([run("drm", wide[:, :, i:i + 3]) for i in (0, 3, 6)], dim=1))


def test_drm_parameter_validation():
    spec = get_method("drm")
    for bad in ({"variant": "X"}, {"density": 1.5}, {"rank_tol": 1.0}, {"qkv_pattern": "["},
                {"lambda": 1.0}):
        with pytest.raises(RecipeError):
            spec.parameters(bad)
    params = spec.parameters({})
    assert (params.variant, params.density, params.scale, params.rank_tol) == ("H", 0.2, 1.0, 1e-2)
