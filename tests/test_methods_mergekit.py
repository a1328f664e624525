"""mergekit's methods in primerge (linear, slerp, nuslerp, multislerp, karcher, model_stock, sce,
nearswap, arcee_fusion) and mergekit's variants of TIES, DARE, DELLA and Breadcrumbs.

Each method is checked against a float64 reference written here from its formula (sharing no code
with primerge), on properties that pin the math down (endpoints, norms, constructed angles, the
Karcher mean's first-order condition), on error paths, and end to end on checkpoint files.

Bounds: float64 checks use 1e-12 relative to the data's scale (tens of operations on O(1)
values, unit roundoff 1.1e-16, no ill-conditioned step: the angles used are far from 0 and π).
The end-to-end merges compute in float32 (unit roundoff 6e-8); their bound, 1e-5 relative to
each tensor's largest entry, leaves a margin of over 100 for the few dozen roundings of each
output entry on any x86-64 CPU or thread count.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import primerge
from primerge.methods import get_method
from primerge.methods.base import TensorContext
from primerge.methods.mergekit_names import MERGEKIT_METHODS, translate
from primerge.methods.stack import TaskStack
from primerge.methods.ties import kept_count
from primerge.util.errors import RecipeError

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def update(method: str, taus: torch.Tensor, base: torch.Tensor, weights=None, **params) -> torch.Tensor:
    """θ − θ₀ that ``method`` gives for task vectors ``taus`` (T, *shape) about ``base``."""
    spec = get_method(method)
    ctx = TensorContext("model.layers.0.mlp.up_proj.weight", "matrix", seed=3, base=base)
    stack = TaskStack.of(taus, None if weights is None else tuple(weights))
    return spec.apply(stack, ctx, spec.parameters(params))


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-12) -> None:
    scale = max(float(expected.abs().max()), 1e-300)
    assert float((actual - expected).abs().max()) <= rel * scale, float((actual - expected).abs().max()) / scale


def zoo(T: int = 3, shape=(6, 8), seed: int = 0, step: float = 0.3):
    """θ₀ and T task vectors sharing a direction (so angles lie between 0 and 90°)."""
    g = gen(seed)
    base = torch.randn(shape, generator=g, dtype=F64)
    shared = torch.randn(shape, generator=g, dtype=F64)
    taus = torch.stack([step * (shared + torch.randn(shape, generator=g, dtype=F64)) for _ in range(T)])
    return base, taus


def slerp_reference(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Shoemake's slerp of the flattened a, b (a float64 reference, no fallback needed here)."""
    omega = math.acos(float((a.flatten() @ b.flatten()) / (a.norm() * b.norm())))
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


# ---------- linear -------------------------------------------------------------------------


def test_linear_is_the_weighted_mean_of_the_models():
    base, taus = zoo()
    w = [0.5, 0.3, 0.7]
    thetas = base + taus
    mean = sum(wt * th for wt, th in zip(w, thetas)) / sum(w)
    close(update("linear", taus * torch.tensor(w, dtype=F64).reshape(-1, 1, 1), base, w), mean - base)
    weighted_sum = sum(wt * th for wt, th in zip(w, thetas))
    close(update("linear", taus * torch.tensor(w, dtype=F64).reshape(-1, 1, 1), base, w, normalize=False),
          weighted_sum - base)


def test_linear_includes_the_base_only_when_listed_as_a_model():
    base, taus = zoo(T=2)
    with_base = torch.cat([torch.zeros_like(taus[:1]), taus])  # the base listed under models: τ = 0
    close(update("linear", with_base, base), (base + (base + taus[0]) + (base + taus[1])) / 3 - base)
    close(update("linear", taus, base), taus.mean(0))


def test_linear_refuses_weights_that_sum_to_zero():
    base, taus = zoo(T=2)
    with pytest.raises(RecipeError, match="sum of the models' weights"):
        update("linear", taus, base, [1.0, -1.0])


# ---------- slerp --------------------------------------------------------------------------


def test_slerp_matches_the_float64_formula():
    base, taus = zoo(T=1)
    for t in (0.25, 0.5, 0.8):
        close(update("slerp", taus, base, t=t), slerp_reference(t, base, base + taus[0]) - base)


def test_slerp_endpoints_and_norm_preservation():
    base, taus = zoo(T=1)
    assert torch.equal(update("slerp", taus, base, t=0.0), torch.zeros_like(base))
    close(update("slerp", taus, base, t=1.0), taus[0])
    # between two tensors of equal norm r, slerp stays on the sphere of radius r
    other = torch.randn(base.shape, generator=gen(5), dtype=F64)
    other = other * base.norm() / other.norm()
    for t in (0.1, 0.5, 0.9):
        merged = base + update("slerp", (other - base)[None], base, t=t)
        assert abs(float(merged.norm() / base.norm()) - 1.0) <= 1e-12


def test_slerp_takes_the_linear_interpolation_for_near_parallel_tensors():
    base = torch.randn(5, 7, generator=gen(1), dtype=F64)
    tau = 1e-3 * base + 1e-6 * torch.randn(5, 7, generator=gen(2), dtype=F64)  # |cos| > 0.9995
    assert torch.equal(update("slerp", tau[None], base, t=0.3), 0.3 * tau)
    antiparallel = -2.0 * base  # θ₁ = −θ₀: cos = −1, no great circle; linear as mergekit does
    close(update("slerp", antiparallel[None], base, t=0.25), 0.25 * antiparallel)


def test_slerp_takes_exactly_one_model():
    base, taus = zoo(T=2)
    with pytest.raises(RecipeError, match="exactly 1 model besides the base; the recipe lists 2"):
        update("slerp", taus, base)


# ---------- nuslerp ------------------------------------------------------------------------


def test_nuslerp_interpolates_task_vectors_with_t_from_the_weights():
    base, taus = zoo(T=2)
    got = update("nuslerp", taus, base, [1.0, 3.0])
    close(got, slerp_reference(0.75, taus[0], taus[1]))
    close(update("nuslerp", taus, base, [2.0, 0.0]), taus[0])
    close(update("nuslerp", taus, base, [0.0, 5.0]), taus[1])
    close(update("nuslerp", taus, base, [1.0, -1.0]), slerp_reference(0.5, taus[0], taus[1]))


def test_nuslerp_rows_and_columns_and_weight_space():
    base, taus = zoo(T=2)
    rows = torch.stack([slerp_reference(0.4, taus[0, i], taus[1, i]) for i in range(6)])
    close(update("nuslerp", taus, base, [0.6, 0.4], flatten=False), rows)
    columns = torch.stack([slerp_reference(0.4, taus[0, :, j], taus[1, :, j]) for j in range(8)], dim=1)
    close(update("nuslerp", taus, base, [0.6, 0.4], nuslerp_flatten=False, nuslerp_row_wise=True), columns)
    absolute = slerp_reference(0.4, base + taus[0], base + taus[1]) - base
    close(update("nuslerp", taus, base, [0.6, 0.4], space="weights"), absolute)


def test_nuslerp_takes_exactly_two_models():
    base, taus = zoo(T=3)
    with pytest.raises(RecipeError, match="exactly 2 models"):
        update("nuslerp", taus, base)


# ---------- multislerp ---------------------------------------------------------------------


def multislerp_reference(vectors: torch.Tensor, w: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Barycentric interpolation on the sphere: tangent space at the normalised weighted mean of
    the directions, weighted tangent vector, exponential map, times Σ w_t ‖v_t‖."""
    flat = vectors.reshape(len(vectors), -1)
    norms = flat.norm(dim=1)
    units = flat / (norms[:, None] + eps)
    m = (w[:, None] * units).sum(0)
    m = m / m.norm()
    g = sum(wt * (u - (u @ m) * m) for wt, u in zip(w, units))
    gn = g.norm() + eps
    return ((math.cos(gn) * m + math.sin(gn) / gn * g) * (w * norms).sum()).reshape(vectors.shape[1:])


def test_multislerp_matches_the_reference_in_both_spaces():
    base, taus = zoo()
    w = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    close(update("multislerp", taus, base, [2.0, 3.0, 5.0]), multislerp_reference(taus, w))
    close(update("multislerp", taus, base, [2.0, 3.0, 5.0], space="weights"),
          multislerp_reference(base + taus, w) - base)
    raw = torch.tensor([2.0, 3.0, 5.0], dtype=F64)
    close(update("multislerp", taus, base, raw.tolist(), normalize_weights=False), multislerp_reference(taus, raw))


def test_multislerp_properties():
    base, taus = zoo(T=2)
    a, b = taus[0], taus[1] * taus[0].norm() / taus[1].norm()  # equal norms: the midpoint is slerp's
    close(update("multislerp", torch.stack([a, b]), base, [1.0, 1.0]), slerp_reference(0.5, a, b), rel=1e-9)
    direction = taus[0] / taus[0].norm()
    same = torch.stack([2.0 * direction, 3.0 * direction, 7.0 * direction])
    close(update("multislerp", same, base, [1.0, 1.0, 2.0]), (0.25 * 2 + 0.25 * 3 + 0.5 * 7) * direction, rel=1e-8)
    assert torch.equal(update("multislerp", taus[:1], base), taus[0])


def test_multislerp_antipodal_models():
    base, taus = zoo(T=1)
    pair = torch.stack([taus[0], -taus[0]])
    close(update("multislerp", pair, base, [1.0, 1.0]), 0.5 * taus[0] - 0.5 * taus[0])
    with pytest.raises(RecipeError, match="directions vanishes"):
        update("multislerp", torch.stack([taus[0], -taus[0], taus[0], -taus[0]]), base)
    with pytest.raises(RecipeError, match="by their sum, which is 0"):
        update("multislerp", torch.cat([taus, taus]), base, [1.0, -1.0])


# ---------- karcher ------------------------------------------------------------------------


def test_karcher_mean_satisfies_the_first_order_condition():
    """At the Karcher mean u, Σ_t α_t log_u(u_t) = 0, log_u(x) = Ω/sin Ω (x − cos Ω u); the norm
    is Σ_t α_t ‖v_t‖. Converged to tol 1e-13 in float64, the residual is below 1e-10."""
    base, taus = zoo(T=3, step=1.0)
    got = update("karcher", taus, base, [1.0, 2.0, 3.0], space="task_vectors", max_iter=200, tol=1e-13)
    alpha = torch.tensor([1.0, 2.0, 3.0], dtype=F64) / 6
    flat = taus.reshape(3, -1)
    assert abs(float(got.norm() - (alpha * flat.norm(dim=1)).sum())) <= 1e-12 * float(got.norm())
    u = got.reshape(-1) / got.norm()
    residual = torch.zeros_like(u)
    for a, v in zip(alpha, flat / flat.norm(dim=1, keepdim=True)):
        cos = float(u @ v)
        omega = math.acos(cos)
        residual += a * omega / math.sin(omega) * (v - cos * u)
    assert float(residual.norm()) < 1e-10


def test_karcher_of_identical_points_and_of_two_points():
    base, taus = zoo(T=1)
    same = taus.expand(3, *taus.shape[1:])
    close(update("karcher", same, base), taus[0])  # weights space: the point θ₁ itself
    close(update("karcher", same, base, space="task_vectors"), taus[0])
    a, b = base + taus[0], 3.0 * base  # two points in weight space, equal weights
    a_scaled = a * b.norm() / a.norm()
    midpoint = slerp_reference(0.5, a_scaled, b)
    got = update("karcher", torch.stack([a_scaled - base, b - base]), base, max_iter=100, tol=1e-13)
    close(base + got, midpoint, rel=1e-10)


def test_karcher_refuses_negative_weights():
    base, taus = zoo(T=2)
    with pytest.raises(RecipeError, match="non-negative with a positive sum"):
        update("karcher", taus, base, [1.0, -0.5])


# ---------- model_stock --------------------------------------------------------------------


def vectors_with_cosine(k: int, cos: float, n: int = 12, seed: int = 0) -> torch.Tensor:
    """k vectors of norm 2 whose pairwise cosines all equal ``cos`` (Cholesky of their Gram matrix)."""
    gram = torch.full((k, k), cos, dtype=F64).fill_diagonal_(1.0)
    basis, _ = torch.linalg.qr(torch.randn(n, k, generator=gen(seed), dtype=F64))
    return 2.0 * (torch.linalg.cholesky(gram) @ basis.T)


@pytest.mark.parametrize("k,cos", [(2, 0.5), (3, 0.2), (4, 0.7), (3, -0.3)])
def test_model_stock_ratio_on_constructed_angles(k, cos):
    taus = vectors_with_cosine(k, cos)
    ratio = k * cos / (1 + (k - 1) * cos)
    close(update("model_stock", taus, torch.zeros(12, dtype=F64)), ratio * taus.mean(0))


def test_model_stock_filter_wise_and_singular_ratio():
    rows = torch.stack([vectors_with_cosine(2, c, seed=i) for i, c in enumerate((0.9, 0.1, 0.5))], dim=1)
    expected = torch.stack([2 * c / (1 + c) * rows[:, i].mean(0) for i, c in enumerate((0.9, 0.1, 0.5))])
    close(update("model_stock", rows, torch.zeros(3, 12, dtype=F64), filter_wise=True), expected)
    opposite = vectors_with_cosine(2, -1.0 + 1e-12)  # 1 + cos θ vanishes: the base is kept
    assert torch.equal(update("model_stock", opposite, torch.zeros(12, dtype=F64)), torch.zeros(12, dtype=F64))
    with pytest.raises(RecipeError, match="at least 2 models"):
        update("model_stock", opposite[:1], torch.zeros(12, dtype=F64))


# ---------- sce ----------------------------------------------------------------------------


def np_sce(taus: np.ndarray, topk: float, floor: float = 0.0) -> np.ndarray:
    """Select entries by variance across tasks, weight tasks by Σ τ², erase minority signs."""
    flat = taus.reshape(len(taus), -1).copy()
    variance = flat.var(axis=0)
    keep = int(np.count_nonzero(variance) * topk) if topk < 1 else flat.shape[1]
    selected = np.zeros(flat.shape[1], dtype=bool)
    selected[np.argsort(-variance, kind="stable")[:keep]] = True
    flat[:, ~selected] = 0.0
    energy = (flat ** 2).mean(axis=1)
    eta = np.full(len(flat), 1 / len(flat)) if energy.sum() <= floor else energy / energy.sum()
    agree = np.sign(flat) == np.sign(flat.sum(0))
    kept = eta[:, None] * agree
    return ((kept * flat).sum(0) / np.maximum(kept.sum(0), 1e-6)).reshape(taus.shape[1:])


def test_sce_matches_the_reference():
    base, taus = zoo()
    for topk in (1.0, 0.5, 0.1):
        close(update("sce", taus, base, select_topk=topk), torch.from_numpy(np_sce(taus.numpy(), topk)))
    close(update("sce", taus, base, weight_floor=1e3), torch.from_numpy(np_sce(taus.numpy(), 1.0, 1e3)))
    assert torch.equal(update("sce", taus, base, select_topk=0.0), torch.zeros_like(base))


# ---------- nearswap -----------------------------------------------------------------------


def test_nearswap_swaps_close_entries_and_damps_far_ones():
    base = torch.randn(4, 5, generator=gen(3), dtype=F64)
    tau = torch.linspace(-0.5, 0.5, 20, dtype=F64).reshape(4, 5)
    got = update("nearswap", tau[None], base, t=0.2)
    expected = torch.where(tau.abs() <= 0.2, tau, 0.2 * torch.sign(tau))
    close(got, expected)
    assert torch.equal(update("nearswap", torch.zeros(1, 4, 5, dtype=F64), base, t=0.2), torch.zeros(4, 5, dtype=F64))


# ---------- arcee_fusion -------------------------------------------------------------------


def test_arcee_fusion_keeps_the_outlying_important_entries():
    base, taus = zoo(T=1, shape=(9, 11))
    theta1 = base + taus[0]
    p, q = np.exp(theta1.numpy()), np.exp(base.numpy())
    p, q = p / p.sum(-1, keepdims=True) + 1e-8, q / q.sum(-1, keepdims=True) + 1e-8
    scores = np.abs(taus[0].numpy()) * (p * np.log(p / q)).sum(-1, keepdims=True)
    ordered = np.sort(scores.reshape(-1))
    n = ordered.size
    q1, med, q3 = (ordered[int(np.floor(f * (n - 1)))] for f in (0.25, 0.5, 0.75))
    keep = scores >= med + 1.5 * (q3 - q1)
    assert 0 < keep.sum() < n  # the fence cuts: some entries kept, most not
    close(update("arcee_fusion", taus, base), torch.from_numpy(np.where(keep, taus[0].numpy(), 0.0)))


# ---------- mergekit's variants of TIES, Task Arithmetic, Breadcrumbs, DARE, DELLA --------


def np_ties_weighted(taus: np.ndarray, w: np.ndarray, k: int, normalize: str) -> np.ndarray:
    """Top-k trim per task, times w_t, sign election, then Σ agreeing / Σ agreeing weights (or plain sum)."""
    flat = taus.reshape(len(taus), -1)
    trimmed = np.zeros_like(flat)
    for t, row in enumerate(flat):
        top = np.argsort(-np.abs(row), kind="stable")[:k]
        trimmed[t, top] = w[t] * row[top]
    agree = (np.sign(trimmed) == np.sign(trimmed.sum(0))) & (trimmed != 0)
    total = (trimmed * agree).sum(0)
    if normalize == "none":
        return total.reshape(taus.shape[1:])
    divisor = (agree * w[:, None]).sum(0)
    return (total / np.where(divisor == 0, 1.0, divisor)).reshape(taus.shape[1:])


def test_ties_mergekit_normalisation_and_counting():
    base, taus = zoo(shape=(7, 1))
    w = np.array([0.5, 1.0, 2.0])  # ties applies the weights itself (weights: given), after the trim
    assert (kept_count(0.5, 7, "nearest"), kept_count(0.5, 7, "floor")) == (4, 3)
    assert (kept_count(0.01, 7, "floor"), kept_count(1.0, 7, "floor"), kept_count(0.0, 7, "floor")) == (1, 7, 0)
    for normalize in ("weights", "none"):
        got = update("ties", taus, base, w.tolist(), density=0.5, rounding="floor", normalize=normalize)
        close(got, torch.from_numpy(np_ties_weighted(taus.numpy(), w, 3, normalize)))


def test_per_model_density_and_l1_rescale():
    base, taus = zoo(shape=(10,))
    got = update("ties", taus, base, density=[0.2, 0.5, 1.0], normalize="none")
    counts = [2, 5, 10]
    trimmed = torch.zeros_like(taus)
    for t, k in enumerate(counts):
        top = taus[t].abs().argsort(descending=True)[:k]
        trimmed[t, top] = taus[t, top]
    elected = torch.sign(trimmed.sum(0))
    close(got, torch.where(torch.sign(trimmed) == elected, trimmed, 0.0).sum(0))
    rescaled = update("ties", taus[:1], base, density=0.3, rescale="l1", normalize="none")
    assert abs(float(rescaled.abs().sum() / taus[0].abs().sum()) - 1.0) <= 1e-12
    with pytest.raises(RecipeError, match="'density' has 2 values but the recipe merges 3 models"):
        update("ties", taus, base, density=[0.2, 0.5])


def test_mergekit_counting_keeps_exactly_k_among_equal_magnitudes():
    tau = torch.tensor([[3.0, -2.0, 2.0, 2.0, 1.0, -0.5]], dtype=F64)  # three entries tie at |2|
    base = torch.zeros(6, dtype=F64)
    nearest = update("ties", tau, base, density=0.5, normalize="none")  # round(3): all ties at the threshold
    floor = update("ties", tau, base, density=0.5, normalize="none", rounding="floor")  # exactly ⌊3⌋
    assert (int((nearest != 0).sum()), int((floor != 0).sum())) == (4, 3)
    assert floor[0] == 3.0 and set(floor[1:4].abs().tolist()) == {0.0, 2.0} and float(floor[4:].abs().sum()) == 0.0


def test_dare_drop_rate_per_model():
    base, taus = zoo(T=2)
    kept = update("dare", taus, base, drop_rate=[0.0, 1.0], rescale="none", scale=1.0)  # keep all / drop all
    assert torch.equal(kept, taus[0])
    with pytest.raises(RecipeError, match="drop_rate 1 drops everything"):
        get_method("dare").parameters({"drop_rate": [0.5, 1.0]})


def test_task_arithmetic_normalised_by_weights():
    base, taus = zoo()
    w = torch.tensor([0.5, 1.5, 3.0], dtype=F64)
    weighted = taus * w.reshape(-1, 1, 1)
    close(update("task_arithmetic", weighted, base, w.tolist(), normalize="weights"), weighted.sum(0) / 5.0)
    close(update("task_arithmetic", weighted, base, w.tolist(), normalize="weights", scale=0.5),
          0.5 * weighted.sum(0) / 5.0)


def test_breadcrumbs_mergekit_scope_and_ties_combine():
    base, taus = zoo(shape=(5, 8))
    flat = taus.reshape(3, -1)
    masked = torch.zeros_like(flat)
    for t in range(3):  # whole tensor: drop the top ⌊0.05·40⌋ = 2, keep the next ⌊0.6·40⌋ = 24
        order = flat[t].abs().argsort(descending=True)
        masked[t, order[2:26]] = flat[t, order[2:26]]
    masked = masked.reshape(taus.shape)
    got = update("breadcrumbs", taus, base, gamma=0.05, density=0.6, scope="tensor", rounding="floor", scale=1.0)
    close(got, masked.sum(0))
    elected = torch.sign(masked.sum(0))
    agree = (torch.sign(masked) == elected) & (masked != 0)
    got = update("breadcrumbs_ties", taus, base, gamma=0.05, density=0.6, normalize=True)
    close(got, (masked * agree).sum(0) / agree.sum(0).clamp(min=1))


def test_composite_names_without_drop_are_their_deterministic_cores():
    base, taus = zoo()
    w = [1.0, 0.5, 2.0]
    weighted = taus * torch.tensor(w, dtype=F64).reshape(-1, 1, 1)
    elected = torch.sign(weighted.sum(0))
    agree = torch.sign(weighted) == elected
    close(update("dare_ties", taus, base, w), (weighted * agree).sum(0))
    close(update("dare_ties", taus, base, w, normalize=True),
          (weighted * agree).sum(0) / (agree * torch.tensor(w, dtype=F64).reshape(-1, 1, 1)).sum(0))
    close(update("dare_linear", taus, base, w, **{"lambda": 0.5}), 0.5 * weighted.sum(0))
    close(update("della_linear", taus, base, w), weighted.sum(0))


def test_translate_maps_every_mergekit_name_onto_a_primerge_method():
    assert set(MERGEKIT_METHODS) == {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                                     "breadcrumbs_ties", "della", "della_linear"}
    assert translate("dare_ties", {"density": [0.3, 0.9]}) == ("dare", {
        "drop_rate": [0.7, pytest.approx(0.1)], "combine": "ties", "rescale": "l1", "normalize": "none", "scale": 1.0})
    method, params = translate("della", {"density": [0.4, 1.0], "epsilon": 0.1})
    assert (method, params["epsilon"], params["normalize"], params["rescale"]) == ("della", [0.1, 0.0], "weights",
                                                                                    "l1")
    assert translate("ties", {"lambda": 0.5})[1] == {"density": 1.0, "rounding": "floor", "normalize": "weights",
                                                     "rescale": "none", "scale": 0.5}
    with pytest.raises(RecipeError, match="density ± epsilon"):
        translate("della", {"density": 0.5, "epsilon": 0.6})


def test_primerge_methods_lists_the_variants_as_mergekit_s():
    for name in ("ties", "dare", "della", "breadcrumbs", "task_arithmetic"):
        spec = get_method(name)
        described = spec.description + " ".join(f.description or "" for f in spec.params_model.model_fields.values())
        assert "mergekit" in described, name
        assert "paper" in described or name == "task_arithmetic", name


# ---------- end to end on checkpoint files -------------------------------------------------


def write_zoo(root, T: int):
    """base.safetensors and T fine-tunes with a 2-D weight, a norm vector and a 3-D experts tensor."""
    g = gen(11)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(6, 8, generator=g),
            "model.layers.0.input_layernorm.weight": 1.0 + 0.1 * torch.randn(8, generator=g),
            "model.layers.0.mlp.experts.weight": torch.randn(2, 4, 5, generator=g)}
    save_file(base, str(root / "base.safetensors"))
    shared = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    paths = []
    for t in range(T):
        model = {k: v + 0.3 * (shared[k] + torch.randn(v.shape, generator=g)) for k, v in base.items()}
        paths.append(root / f"ft{t}.safetensors")
        save_file(model, str(paths[-1]))
    return root / "base.safetensors", paths


def merged(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def close_f32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    close(actual.double(), expected, rel=1e-5)


def test_end_to_end_slerp_per_tensor_and_per_expert(tmp_path):
    base_path, models = write_zoo(tmp_path, 1)
    base, model = load_file(str(base_path)), load_file(str(models[0]))
    out = tmp_path / "slerp"
    primerge.merge(base_path, models, "slerp", parameters={"t": 0.4}, out=out)
    got = merged(out)
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight"):
        close_f32(got[name], slerp_reference(0.4, base[name].double(), model[name].double()))
    experts = "model.layers.0.mlp.experts.weight"  # fused experts: each expert matrix on its own
    for e in range(2):
        close_f32(got[experts][e], slerp_reference(0.4, base[experts][e].double(), model[experts][e].double()))


def test_end_to_end_nuslerp_model_stock_and_linear(tmp_path):
    base_path, models = write_zoo(tmp_path, 2)
    base = {k: v.double() for k, v in load_file(str(base_path)).items()}
    thetas = [{k: v.double() for k, v in load_file(str(m)).items()} for m in models]
    name = "model.layers.0.mlp.up_proj.weight"
    taus = [th[name] - base[name] for th in thetas]

    out = tmp_path / "nuslerp"
    primerge.merge(base_path, [{"path": models[0], "weight": 1.0}, {"path": models[1], "weight": 3.0}],
                   "nuslerp", out=out)
    close_f32(merged(out)[name], base[name] + slerp_reference(0.75, taus[0], taus[1]))

    out = tmp_path / "model_stock"
    primerge.merge(base_path, models, "model_stock", out=out)
    cos = float(taus[0].flatten() @ taus[1].flatten() / (taus[0].norm() * taus[1].norm()))
    close_f32(merged(out)[name], base[name] + 2 * cos / (1 + cos) * (taus[0] + taus[1]) / 2)

    out = tmp_path / "linear"
    primerge.merge(base_path, [{"path": models[0], "weight": 1.0}, {"path": models[1], "weight": 3.0}],
                   "linear", out=out)
    close_f32(merged(out)[name], (thetas[0][name] + 3 * thetas[1][name]) / 4)


def test_end_to_end_wrong_number_of_models_is_refused_before_reading(tmp_path):
    base_path, models = write_zoo(tmp_path, 2)
    with pytest.raises(RecipeError, match="method 'slerp' merges exactly 1 model besides the base; the recipe "
                                          "lists 2"):
        primerge.merge(base_path, models, "slerp", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dare_per_model_drop_rate_equal_to_one_rate_gives_the_same_bits():
    """A list of equal per-model rates is the scalar rate: the same draws are kept and rescaled by
    the same float32 1/(1 − p) (computed in float64 and rounded once, as a Python float divisor is)."""
    from primerge.methods import get_method
    from primerge.methods.base import TensorContext
    from primerge.methods.stack import TaskStack

    spec = get_method("dare")
    taus = TaskStack.of(torch.randn(3, 32, 24, generator=torch.Generator().manual_seed(0)))
    ctx = TensorContext("w", "matrix", 7)
    one = spec.apply(taus, ctx, spec.parameters({"drop_rate": 0.8}))
    each = spec.apply(taus, ctx, spec.parameters({"drop_rate": [0.8, 0.8, 0.8]}))
    assert torch.equal(one, each)
