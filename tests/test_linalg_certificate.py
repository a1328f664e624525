"""``svd: auto``'s acceptance of a block Krylov SVD (primerge.linalg.certificate) and what a merge
reports about its SVDs (primerge.linalg.outcomes).

The matrices are gap-free the way fine-tune deltas are: three strong directions over a Gaussian
noise floor holding half the energy, cut at k = 4, inside the floor's Marchenko–Pastur edge, where
the residual check cannot pass. Every bound is checked against float64 references. Margins: the
float32 iteration perturbs β, θ and ρ by O(2^-24·‖A‖·√n) ≈ 1e-5 of ‖A‖ on any CPU or thread
count, while the accepted cases sit ≥ 10% below their allowance and the rejected ones ≥ 10× above.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from safetensors.torch import save_file

from primerge.api import merge_recipe
from primerge.core.recipe import build_recipe
from primerge.linalg import OutputPrecision, SVDOutcomes, block_krylov_svd, recording, truncated_svd
from primerge.linalg.certificate import CERTIFIED_STEPS, ENERGY_EPSILON, ROUNDING_RMS, unit_roundoff
from primerge.linalg.truncated import exact_top
from primerge.methods.base import TensorContext
from primerge.util.deterministic import ThreadIndependent

from helpers import on_thread_counts, run

T, M, N, K = 3, 384, 768, 4
#: θ₀'s element RMS over the task vectors' (the bench zoo's 0.02 / 1e-3).
BASE_RATIO = 20.0


def gap_free(seed: int, tasks: int = T, m: int = M, n: int = N, noise: float = 0.5) -> torch.Tensor:
    """Task vectors of three strong directions over a Gaussian noise floor with ``noise`` of the energy."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(tasks):
        U = torch.linalg.qr(torch.randn(m, 3, generator=g, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(n, 3, generator=g, dtype=torch.float64)).Q
        strong = (U * torch.tensor([1.0, 0.8, 0.6], dtype=torch.float64)) @ V.mT
        floor = torch.randn(m, n, generator=g, dtype=torch.float64)
        out.append(math.sqrt(1 - noise) * strong / strong.norm() + math.sqrt(noise) * floor / floor.norm())
    return torch.stack(out).float()


def precision(dtype: torch.dtype, taus: torch.Tensor, ratio: float = BASE_RATIO) -> OutputPrecision:
    rms = ratio * float(taus.double().square().mean().sqrt())
    return OutputPrecision(str(dtype).removeprefix("torch."), unit_roundoff(dtype), rms)


def test_rounding_model_matches_round_to_nearest():
    """‖fl(θ) − θ‖_F = u‖θ‖_F/√(8 ln 2) for log-distributed mantissas; N(0, σ²) values come within 2%
    (4M samples: the estimate's own spread is ~0.1%)."""
    theta = 0.02 * torch.randn(4_000_000, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.bfloat16, torch.float16):
        found = float((theta.to(dtype).float() - theta).norm() / theta.norm())
        assert found == pytest.approx(ROUNDING_RMS * unit_roundoff(dtype), rel=0.02)
    assert OutputPrecision.of(torch.bfloat16, theta).tolerant
    assert not OutputPrecision.of(torch.float32, theta).tolerant
    assert OutputPrecision.of(torch.float32, theta).allowance((M, N)) is None


def test_gap_free_spectrum_is_certified_for_bf16_and_the_bounds_hold_in_float64():
    """Kept for a bf16 output although the residual check fails; then, in float64: the Ritz triplets
    are exact for Ã = A − R_kV_kᵀ; hypothesis (H) holds here (‖D‖₂ ≤ θ_{k+1} + ρ_{k+1}); Â's exact
    top-k singular values are θ̂ and ‖A − Â‖_F ≤ β; the truncation error is within (1 + ε) of the
    optimum with ε ≤ ENERGY_EPSILON."""
    taus = gap_free(1)
    allowance = precision(torch.bfloat16, taus).allowance(taus.shape)
    found = block_krylov_svd(taus, K, seed=3, allowance=allowance)
    verdict = found.certificate
    assert not verdict.strict.any() and verdict.certified.all()
    assert found.passes >= 2 * CERTIFIED_STEPS + 3
    assert (verdict.backward <= 0.9 * allowance).all() and (verdict.epsilon <= ENERGY_EPSILON).all()
    for t in range(2):  # two members: the float64 SVDs below are the test's cost
        U, S, V = (part[t].double() for part in found.factors)
        A, U, V = taus[t].double().mT, V, U  # M < N: the iteration runs on Aᵀ (p ≥ q), where Aᵀu_i = θ_i v_i
        scale = float(A.norm())
        R = A @ V - U * S
        tilde = A - R @ V.mT
        assert float((tilde @ V - U * S).norm()) <= 1e-5 * scale
        assert float((tilde.mT @ U - V * S).norm()) <= 1e-5 * scale
        D = (A - U @ (U.mT @ A)) - (A - U @ (U.mT @ A)) @ V @ V.mT
        floor = float(verdict.floor[t])
        assert float(torch.linalg.matrix_norm(D, 2)) <= floor * (1 + 1e-5)
        lifted = torch.clamp(S, min=floor)
        hat = (U * lifted) @ V.mT + D
        assert float((A - hat).norm()) == pytest.approx(float(verdict.backward[t]), rel=1e-3)
        assert torch.allclose(torch.linalg.svdvals(hat)[:K], lifted, rtol=1e-5)
        sigma = torch.linalg.svdvals(A)
        achieved = float((A - U @ (U.mT @ A)).square().sum())
        assert achieved <= (1 + float(verdict.epsilon[t])) * float(sigma[K:].square().sum())


def test_auto_keeps_the_certified_krylov_triplets_and_records_why():
    taus = gap_free(2)
    with recording() as outcomes:
        kept = truncated_svd(taus, K, seed=3, precision=precision(torch.bfloat16, taus))
    found = block_krylov_svd(taus, K, seed=3, allowance=precision(torch.bfloat16, taus).allowance(taus.shape))
    assert all(torch.equal(a, b) for a, b in zip(kept, found.factors))
    assert outcomes.counts == {("krylov", "certified for bfloat16 output"): T}
    assert outcomes.passes == T * found.passes and outcomes.flops > 0 and outcomes.epsilon > 0


@pytest.mark.parametrize("dtype, ratio", [(torch.float32, BASE_RATIO), (torch.float16, 1.0)])
def test_strict_outputs_and_unreachable_allowances_get_the_exact_svd(dtype, ratio):
    """float32 output: residual check only, which a gap-free cut fails. fp16 with θ₀ no larger than
    τ: an allowance of 0.5·0.42·2^-11 ≈ 1e-4 of ‖τ‖, which the noise edge's Ritz vectors are ≥ 10×
    away from after every step (adversarial: gap-free, no structure to converge to). Both give the
    exact SVD's bits."""
    taus = gap_free(3)
    given = precision(dtype, taus, ratio)
    with recording() as outcomes:
        got = truncated_svd(taus, K, seed=3, precision=given)
    exact = exact_top(taus, K)
    assert all(torch.equal(a, b) for a, b in zip(got, exact))
    assert outcomes.matrices("exact") == T and outcomes.matrices("krylov") == 0
    [(path, reason)] = outcomes.counts
    assert ("strict" in reason) == (dtype == torch.float32)


def test_a_matrix_the_iteration_cannot_certify_in_time_is_rejected():
    """The certificate never accepts before CERTIFIED_STEPS Krylov steps, whatever the allowance."""
    taus = gap_free(4)
    generous = precision(torch.bfloat16, taus, ratio=1e6).allowance(taus.shape)
    found = block_krylov_svd(taus, K, seed=3, allowance=generous, steps=CERTIFIED_STEPS - 1)
    assert not found.converged.any()


def test_prime_with_a_bf16_precision_gives_the_same_bytes_on_every_thread_count():
    taus = gap_free(5)
    ctx = TensorContext("layer.weight", "matrix", seed=3, precision=precision(torch.bfloat16, taus))
    outputs = on_thread_counts(lambda: run("prime", taus, ctx, rank=0.01))
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])


def test_outcomes_pickle_and_reduce_in_any_order():
    first, second = SVDOutcomes(), SVDOutcomes()
    first.add("krylov", "residual check", 3)
    second.add("krylov", "residual check", 2)
    second.add("exact", "cost model", 4)
    second.epsilon, second.flops, second.seconds = 0.1, 5.0, {"exact": 1.5}
    total = pickle.loads(pickle.dumps(first)) + second
    assert total == second + first
    assert total.counts == {("krylov", "residual check"): 5, ("exact", "cost model"): 4}
    assert total.epsilon == 0.1 and total.flops == 5.0 and total.seconds == {"exact": 1.5}
    assert total.lines()[0].startswith("svd (merge): 5 matrices by block Krylov")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_merge_reports_its_svd_paths_on_stderr_and_in_the_card(tmp_path, capsys, dtype):
    """Two 384 × 768 matrices, three bf16 (or float32) fine-tunes with gap-free deltas: PRIME's
    1% rank is 4, where ``auto`` tries block Krylov; bf16 keeps it (certified), float32 redoes it."""
    g = torch.Generator().manual_seed(6)
    names = ["layers.0.mlp.up_proj.weight", "layers.1.mlp.up_proj.weight"]
    base = {n: 0.02 * torch.randn(M, N, generator=g) for n in names}
    deltas = {n: 1e-3 * math.sqrt(M * N) * gap_free(7 + i) for i, n in enumerate(names)}
    folders = []
    for label, state in [("base", base)] + [(f"ft{t}", {n: base[n] + deltas[n][t] for n in names}) for t in range(T)]:
        folder = tmp_path / label
        folder.mkdir()
        save_file({n: v.to(dtype).contiguous() for n, v in state.items()}, str(folder / "model.safetensors"))
        folders.append(str(folder))
    recipe = build_recipe({"base": folders[0], "models": folders[1:], "method": "prime"})
    result = merge_recipe(recipe, out=tmp_path / "out", quiet=False)
    krylov, exact = result.svd.matrices("krylov"), result.svd.matrices("exact")
    assert (krylov, exact) == ((2 * T, 0) if dtype == torch.bfloat16 else (0, 2 * T))
    card = (tmp_path / "out" / "README.md").read_text()
    err = capsys.readouterr().err
    for line in result.svd.lines():
        assert line in err and line in card
    assert "## Truncated SVDs" in card


def test_rank_auto_merge_reuses_the_pre_pass_exact_svds_with_the_same_bits():
    """PRIME ``rank: auto``: the pre-pass' exact SVDs (rank r_max) are sliced by the merge (rank r*)
    instead of recomputed; an empty memo (a Ray worker's) recomputes them with identical bits."""
    from helpers import run_passes
    from primerge.methods import get_method

    spec = get_method("prime")
    params = spec.parameters({"rank": "auto", "svd": "exact"})
    taus = [gap_free(8 + i, tasks=3, m=40, n=64) for i in range(2)]
    contexts = [TensorContext(f"layer{i}.weight", "matrix", seed=i) for i in range(2)]
    with ThreadIndependent():
        auto = run_passes(spec.make_prepass(params), list(zip(taus, contexts)))
        fresh = pickle.loads(pickle.dumps(auto))
        assert len(auto.memo.kept) == 2 and not fresh.memo.kept
        for x, ctx in zip(taus, contexts):
            with recording() as reused:
                kept = spec.apply(x, TensorContext(ctx.name, "matrix", ctx.seed, auto), params)
            with recording() as computed:
                again = spec.apply(x, TensorContext(ctx.name, "matrix", ctx.seed, fresh), params)
            assert torch.equal(kept, again)
            assert reused.flops == 0 < computed.flops
    assert not auto.memo.kept  # each matrix's factors are freed once the merge took them
