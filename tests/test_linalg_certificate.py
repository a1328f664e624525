"""``svd: auto``'s acceptance of a block Krylov SVD (primerge.linalg.certificate), how the methods'
members share it (TSV, PRIME, Iso-CTS) and what a merge reports about its SVDs (primerge.linalg.outcomes).

The matrices are gap-free the way fine-tune deltas are: three strong directions over a Gaussian
noise floor holding half the energy (a tenth where a method's cut lies deep in the floor), cut
inside the floor's Marchenko–Pastur edge, where the residual check cannot pass. Every bound is
checked against float64 references. Margins: the float32 iteration perturbs β, θ and ρ by
O(2^-24·‖A‖·√n) ≈ 1e-5 of ‖A‖ on any CPU or thread count, while the accepted cases sit ≥ 10% below
their allowance and the rejected ones ≥ 10× above.
"""

from __future__ import annotations

import math
import pickle
import re

import pytest
import torch
from safetensors.torch import save_file

from primerge.api import merge_recipe
from primerge.core.recipe import build_recipe
from primerge.linalg import (
    SVD,
    KrylovSVD,
    OutputPrecision,
    SVDOutcomes,
    block_krylov_svd,
    project_out,
    recording,
    truncated_svd,
)
from primerge.linalg import certificate as certificate_module
from primerge.linalg import truncated as truncated_module
from primerge.linalg.certificate import (
    CERTIFIED_STEPS,
    ENERGY_EPSILON,
    ROUNDING_FRACTION,
    ROUNDING_RMS,
    Combination,
    combined,
    unit_roundoff,
)
from primerge.linalg.choice import MARGIN, choose_svd, exact_seconds, randomized_seconds
from primerge.linalg.krylov import gap_free_floor, hopeless
from primerge.linalg.truncated import exact_top
from primerge.methods import iso as iso_module
from primerge.methods.base import TensorContext
from primerge.methods.tsv import concat_factors, summed_parts, whiten, whitened_merge
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
    assert (verdict.backward <= 0.9 * allowance.budget).all() and (verdict.epsilon <= ENERGY_EPSILON).all()
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


@pytest.mark.parametrize("dtype, ratio", [(torch.float32, BASE_RATIO), (torch.float16, 0.1)])
def test_strict_outputs_and_unreachable_allowances_get_the_exact_svd(dtype, ratio, monkeypatch):
    """float32 output: residual check only, which a gap-free cut fails after an attempt. fp16 with θ₀
    a tenth of τ: an allowance of 0.5·0.42·2^-11·0.1 ≈ 10⁻⁵ of ‖τ‖, for which the gap-free model
    expects the certificate after 1 + ln(lead·D)/μ = 14.4 steps, beyond the 11 the budget affords
    (a margin of e^{3.4μ} ≈ 8× in D): those members get the exact SVD without an attempt. Both give
    the exact SVD's bits."""
    taus = gap_free(3)
    given = precision(dtype, taus, ratio)
    attempts = []
    monkeypatch.setattr(truncated_module, "block_krylov_svd",
                        lambda x, *args, **options: attempts.append(x) or block_krylov_svd(x, *args, **options))
    with recording() as outcomes:
        got = truncated_svd(taus, K, seed=3, precision=given)
    exact = exact_top(taus, K)
    assert all(torch.equal(a, b) for a, b in zip(got, exact))
    assert outcomes.matrices("exact") == T and outcomes.matrices("krylov") == 0
    [(path, reason)] = outcomes.counts
    assert ("strict" in reason) == (dtype == torch.float32) == bool(attempts)
    expected = "certificate expected after 15 Krylov steps, beyond the 11 budgeted (gap-free model)"
    assert dtype == torch.float32 or reason == expected


def test_members_the_model_puts_beyond_the_budget_get_the_exact_svd_without_an_attempt(monkeypatch):
    """One member 1000× larger than its share of the allowance allows for the others: its demand
    D = g‖A‖_F/b is 1000× theirs, so the gap-free model expects its certificate ln(1000)/μ ≈ 11 steps
    later (1 + ln(lead·D)/μ = 13.7 against their 2.5: ⌈·⌉ = 14, 0.3 from a step either way), beyond
    the budget of 11; it gets the exact SVD's bits and the attempt runs on the other two alone, whose
    Ritz triplets are kept as that attempt gives them."""
    taus = gap_free(8)
    given = precision(torch.bfloat16, taus)
    taus[1] *= 1000
    attempts = []

    def attempt(x, *args, **options):
        attempts.append((x, block_krylov_svd(x, *args, **options)))
        return attempts[-1][1]

    monkeypatch.setattr(truncated_module, "block_krylov_svd", attempt)
    with recording() as outcomes:
        got = truncated_svd(taus, K, seed=3, precision=given)
    [(tried, found)] = attempts
    assert torch.equal(tried, taus[[0, 2]]) and found.converged.all()
    for part, ritz, full in zip(got, found.factors, exact_top(taus[1:2], K)):
        assert torch.equal(part[[0, 2]], ritz) and torch.equal(part[1], full[0])
    budget = choose_svd(tuple(taus.shape), K, True).steps
    assert outcomes.counts == {("krylov", "certified for bfloat16 output"): 2,
                               ("exact", f"certificate expected after 14 Krylov steps, beyond the {budget} "
                                         "budgeted (gap-free model)"): 1}


def test_the_stopping_rule_extrapolates_at_the_faster_of_the_last_step_and_the_floor():
    """Hand trajectories (excess per step): without the floor's rate (the residual check) a member stops
    when its last step's contraction cannot bring it to 1 in the steps left, and a single step proves
    nothing; with it, a slow last step (0.95) is extrapolated at e^{−μ} = ½ instead, so it still needs
    ln 9.5 / ln 2 = 3.25 steps: kept with 4 left, given up with 3. Accepted members (≤ 1) never stop it."""
    history = [torch.tensor([10.0, 0.5]), torch.tensor([9.5, 0.4])]
    assert hopeless(history, 10) and not hopeless(history[:1], 0)
    assert not hopeless(history, 4, rate=math.log(2)) and hopeless(history, 3, rate=math.log(2))
    assert not hopeless([torch.tensor([10.0]), torch.tensor([2.0])], 1)  # 2 → 0.4 at the last rate
    assert not hopeless([torch.tensor([3.0]), torch.tensor([1.0])], 0)


def test_a_trajectory_that_cannot_reach_acceptance_within_its_budget_stops_after_two_certified_steps():
    """θ₀ twice τ (bf16): the certificate accepts at step 6 (15 passes). Within a budget of 3 steps the
    excesses after steps 1 and 2, extrapolated at the faster of their ratio and e^{−μ}, need ≥ 2.1
    more steps where 1 is left: the iteration stops after step 2 (7 passes), its members rejected. Its
    cost, c(2), is within MARGIN of the exact SVDs (the waste bound of a given-up member)."""
    taus = gap_free(6)
    allowance = precision(torch.bfloat16, taus, 2.0).allowance(taus.shape)
    floor = gap_free_floor(K, tuple(taus.shape))
    first, second = (block_krylov_svd(taus, K, seed=3, allowance=allowance, steps=s).certificate.excess for s in (1, 2))
    contraction = torch.minimum(second / first, torch.full_like(first, math.exp(-floor.rate)))
    assert (torch.log(second) / -torch.log(contraction) >= 2).all()
    stopped = block_krylov_svd(taus, K, seed=3, allowance=allowance, steps=3)
    assert stopped.passes == 7 and not stopped.converged.any()
    assert block_krylov_svd(taus, K, seed=3, allowance=allowance, steps=11).passes == 15
    assert randomized_seconds(tuple(taus.shape), K, 2) <= MARGIN * exact_seconds(tuple(taus.shape))


def test_a_member_the_model_misjudges_is_given_up_and_redone_exactly(monkeypatch):
    """θ₀ a hundredth of τ: the model is made to admit the members (as if it had misjudged them); their
    trajectory, 200× the one above, needs ≥ 9.4 more steps after step 2 at the faster of its last
    contraction and e^{−μ} where the budget of 11 leaves 9 (a margin of 1.3× in the excess), so the
    attempt stops there and every member gets the exact SVD's bits."""
    taus = gap_free(6)
    monkeypatch.setattr(truncated_module, "certificate_steps",
                        lambda shape, rank, demand: torch.full_like(demand, float(CERTIFIED_STEPS)))
    with recording() as outcomes:
        got = truncated_svd(taus, K, seed=3, precision=precision(torch.bfloat16, taus, 0.01))
    assert all(torch.equal(a, b) for a, b in zip(got, exact_top(taus, K)))
    assert outcomes.counts == {("exact", "residual check and certificate failed after 7 passes"): T}


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


def write_fine_tunes(root, dtype: torch.dtype, tasks: int = T, noise: float = 0.5) -> list[str]:
    """A base and ``tasks`` fine-tunes of two 384 × 768 matrices stored as ``dtype``: θ₀ ~ N(0, 0.02²),
    gap-free deltas of element RMS 1e-3 (the bench zoo's scales). Returns the folders, base first."""
    g = torch.Generator().manual_seed(6)
    names = ["layers.0.mlp.up_proj.weight", "layers.1.mlp.up_proj.weight"]
    base = {n: 0.02 * torch.randn(M, N, generator=g) for n in names}
    deltas = {n: 1e-3 * math.sqrt(M * N) * gap_free(7 + i, tasks=tasks, noise=noise) for i, n in enumerate(names)}
    folders = []
    states = [("base", base)] + [(f"ft{t}", {n: base[n] + deltas[n][t] for n in names}) for t in range(tasks)]
    for label, state in states:
        folder = root / label
        folder.mkdir()
        save_file({n: v.to(dtype).contiguous() for n, v in state.items()}, str(folder / "model.safetensors"))
        folders.append(str(folder))
    return folders


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_merge_reports_its_svd_paths_on_stderr_and_in_the_card(tmp_path, capsys, dtype):
    """Two 384 × 768 matrices, three bf16 (or float32) fine-tunes with gap-free deltas: PRIME's
    1% rank is 4, where ``auto`` tries block Krylov; bf16 keeps it (certified), float32 redoes it."""
    folders = write_fine_tunes(tmp_path, dtype)
    recipe = build_recipe({"base": folders[0], "models": folders[1:], "method": "prime"})
    result = merge_recipe(recipe, out=tmp_path / "out", quiet=False)
    krylov, exact = result.svd.matrices("krylov"), result.svd.matrices("exact")
    assert (krylov, exact) == ((2 * T, 0) if dtype == torch.bfloat16 else (0, 2 * T))
    card = (tmp_path / "out" / "README.md").read_text()
    err = capsys.readouterr().err
    for line in result.svd.lines():
        assert line in err and line in card
    assert "## Truncated SVDs" in card


def announced(decisions: list[str]) -> dict[str, int]:
    """Matrices that the plan's ``svd: auto`` lines send to each path: {exact|randomized: members}
    ("svd: auto: MODE SVD of T×m×n at rank r (K matrices): why")."""
    paths = {"exact": 0, "randomized": 0}
    for line in decisions:
        if match := re.match(r"svd: auto: (\w+) SVD of ([\d×]+) at rank \d+ \((\d+) matri", line):
            shape = [int(d) for d in match.group(2).split("×")]
            paths[match.group(1)] += int(match.group(3)) * math.prod(shape[:-2])
    return paths


@pytest.mark.parametrize("method", ["tsv", "iso_cts", "prime"])
def test_the_plan_announces_what_a_bf16_merge_then_does(tmp_path, method):
    """Six bf16 fine-tunes: the plan's ``svd: auto`` lines (decided from the shapes and the output dtype)
    send as many members to the Krylov branch as the merge then handles there: tried (kept, or redone
    exactly after failing its tests) or sent to the exact SVD by their own certificate estimate; the
    others are exact by the cost model of the shapes. TSV's 6 × 384 × 768 SVD at rank 64 enters the
    branch only because the output is 16-bit (whose two budgeted steps the estimate then finds too few),
    so a method that did not hand its output precision to its SVDs would take them exact (cost model)
    while the plan said otherwise."""
    folders = write_fine_tunes(tmp_path, torch.bfloat16, tasks=METHOD_TASKS, noise=METHOD_NOISE)
    recipe = build_recipe({"base": folders[0], "models": folders[1:], "method": method})
    result = merge_recipe(recipe, out=tmp_path / "out")
    paths = announced(result.decisions)
    tried = sum(count for (path, reason), count in result.svd.counts.items() if reason != "cost model")
    assert paths["randomized"] == tried > 0
    assert paths["exact"] == result.svd.counts.get(("exact", "cost model"), 0)


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


# ---------------------------------------------------------------- how the members of a method combine

#: Six tasks with a tenth of their energy in the floor: PRIME cuts at 4 (the edge) and Iso-CTS's
#: task-specific SVDs at 13 of the projected task vectors; each method's members are certified for a
#: bf16 output sharing its allowance (≥ 10% below their shares).
METHOD_TASKS, METHOD_NOISE = 6, 0.1
#: TSV cuts at k = r_full/T: with six tasks at 64 of 384, where the budget (c(J) ≤ MARGIN·E) affords
#: two Krylov steps and its ε bound alone needs four, so its members go exact. Sixteen tasks (k = 24,
#: budget 5) of θ₀ 400× τ: the model expects the certificate at 1 + ln(lead·D)/μ = 3.85 → 4 steps,
#: where it comes.
TSV_TASKS, TSV_BASE_RATIO = 16, 400.0
#: Iso-CTS's projected task vectors have rank ≤ r_full − k_c = 78, which the Krylov basis spans (and
#: the residual check accepts) from its fourth block: certified before that with θ₀ 200× τ (fine-tunes
#: with small deltas), not with the bench's 20× (BASE_RATIO, TSV's and PRIME's cases).
ISO_BASE_RATIO = 200.0


def perturbed(x: torch.Tensor, factors: SVD, floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The certificate's Â of every member, built as its docstring does (float64): on A = x (or xᵀ, the
    side where the iteration ran, p ≥ q), Â = U_k Θ̂ V_kᵀ + D with D = (I − U_kU_kᵀ) A (I − V_kV_kᵀ)
    and θ̂ = max(θ, floor). Returns (Â in x's orientation, ζ = θ̂ − θ, θ̂_k − ‖D‖₂: Â's gap at the cut)."""
    flip = x.shape[-2] < x.shape[-1]
    A = x.mT if flip else x
    U, V = (factors.V, factors.U) if flip else (factors.U, factors.V)
    zeta = (floor.unsqueeze(-1) - factors.S).clamp_min(0)
    outside = A - U @ (U.mT @ A)
    D = outside - (outside @ V) @ V.mT
    lifted = factors.S + zeta
    hat = (U * lifted.unsqueeze(-2)) @ V.mT + D
    gap = lifted[..., -1] - torch.linalg.eigvalsh(D.mT @ D)[..., -1].clamp_min(0).sqrt()
    return (hat.mT if flip else hat), zeta, gap


def round_off_bound(gap: torch.Tensor, theta: torch.Tensor, bases: torch.Tensor) -> float:
    """Relative float64 round-off of an exact-path merge of Â: LAPACK's backward error n·2^-53·‖Â‖₂
    (n = N) moves the kept subspace by at most that over Â's gap at the cut (Wedin), and Whitening's
    polar factor multiplies a change of its argument by at most 1/σ_min (Higham 2008, Theorem 8.9)."""
    sigma_min = float(torch.linalg.svdvals(bases)[-1])
    return N * 2.0**-53 * float((theta[:, 0] / gap).max()) / sigma_min


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def method_case(ratio: float = BASE_RATIO, tasks: int = METHOD_TASKS) -> tuple[torch.Tensor, TensorContext]:
    """Float64 task vectors (so that the Ritz triplets are exact to float64 for the comparison) and a
    bf16 output's context."""
    taus = gap_free(31, tasks=tasks, noise=METHOD_NOISE).double()
    return taus, TensorContext("layer.weight", "matrix", seed=3, precision=precision(torch.bfloat16, taus, ratio))


def certified_merge(method: str, taus: torch.Tensor, ctx: TensorContext, monkeypatch,
                    **params) -> tuple[torch.Tensor, KrylovSVD]:
    """The method's merge under ``svd: auto`` for a bf16 output, whose decomposed members must all be
    certified (Iso-CTS's common SVD, at rank 0.8·r_full, is exact by the cost model), and the block
    Krylov SVD that found them."""
    found = []

    def kept(*args, **options):
        found.append(block_krylov_svd(*args, **options))
        return found[-1]

    monkeypatch.setattr(truncated_module, "block_krylov_svd", kept)
    with ThreadIndependent(), recording() as outcomes:
        merged = run(method, taus, ctx, **params)
    monkeypatch.undo()
    assert outcomes.matrices("krylov") == taus.shape[0] == outcomes.counts[("krylov", "certified for bfloat16 output")]
    assert outcomes.counts.get(("exact", "cost model"), 0) == (method == "iso_cts")
    [krylov] = found
    return merged, krylov


def test_tsv_merge_of_certified_triplets_is_the_exact_merge_of_task_vectors_within_beta(monkeypatch):
    """TSV on a bf16 output: the Ritz triplets are certified, and the merge written from them is the
    exact-SVD TSV merge of the Â_t (‖A_t − Â_t‖_F = β_t, within each member's share) with its values
    lowered by ζ: α Û diag(ζ) V̂ᵀ, to float64 round-off (:func:`round_off_bound`); without the ζ
    term it is ≥ 10× the bound off."""
    taus, ctx = method_case(TSV_BASE_RATIO, TSV_TASKS)
    merged, found = certified_merge("tsv", taus, ctx, monkeypatch)
    hat, zeta, gap = perturbed(taus, found.factors, found.certificate.floor)
    assert torch.allclose((taus - hat).flatten(1).norm(dim=1), found.certificate.backward, rtol=1e-9)
    assert (found.certificate.share <= 0.9).all() and (gap > 0).all() and (zeta > 0).any()
    with ThreadIndependent():
        exact = run("tsv", hat, svd="exact")
    stacked = concat_factors(found.factors)
    U_hat, V_hat = whiten(stacked)
    expected = exact - (U_hat * zeta.reshape(-1)) @ V_hat.mT
    bound = round_off_bound(gap, found.factors.S, stacked.U)
    assert relative(merged, expected) <= bound
    assert relative(merged, exact) >= 10 * bound


@pytest.mark.parametrize("transposed", [False, True])
def test_prime_merge_of_certified_triplets_is_the_exact_merge_of_task_vectors_within_beta(transposed, monkeypatch):
    """PRIME on a bf16 output: the merge from the Ritz triplets is the exact-SVD PRIME merge of the Â_t,
    less α Û diag(ζ) V̂ᵀ (its values) and plus α P⊥ mean_t(A_t − Â_t) (its residual term takes the given
    A_t), to float64 round-off. For m < n the last term vanishes (A_t − Â_t = U_k(·)ᵀ there, and
    P⊥U_k = 0); for m > n it does not, and leaving it out is ≥ 10× the round-off bound. Its members
    (6 × 4 directions of 384) are accepted by the summed test, which is ‖Σ_t (A_t − Â_t)‖_F over the
    whole allowance, and not by their shares alone."""
    taus, ctx = method_case()
    taus = taus.mT.contiguous() if transposed else taus
    merged, found = certified_merge("prime", taus, ctx, monkeypatch)
    hat, zeta, gap = perturbed(taus, found.factors, found.certificate.floor)
    assert (found.certificate.used <= 0.9).all() and (gap > 0).all()
    with ThreadIndependent():
        exact = run("prime", hat, svd="exact")
    stacked = concat_factors(found.factors)
    U_hat, V_hat = whiten(stacked)
    lowered = exact - (U_hat * zeta.reshape(-1)) @ V_hat.mT
    residual_term = project_out(U_hat, (taus - hat).mean(0))
    bound = round_off_bound(gap, found.factors.S, stacked.U)
    assert relative(merged, lowered + residual_term) <= bound
    assert (relative(merged, lowered) >= 10 * bound) == transposed
    whole = combined(ctx.precision, summed_parts(METHOD_TASKS, 1.0)).allowance(taus.shape)
    summed = float((taus - hat).sum(0).norm()) / (whole.budget * METHOD_TASKS)
    assert torch.allclose(found.certificate.summed, torch.tensor(summed, dtype=torch.float64), rtol=1e-6)
    assert (found.certificate.share > 1).any()


def test_iso_cts_merge_of_certified_triplets_is_the_exact_merge_of_projected_task_vectors_within_beta(monkeypatch):
    """Iso-CTS on a bf16 output: its task-specific members (the task vectors projected off the common
    subspace, w_t) are certified, and its merge equals Iso-CTS with those SVDs replaced by the exact SVDs
    of the ŵ_t (‖w_t − ŵ_t‖_F = β_t), rescaled by s̄_θ̂ / s̄_θ = 1 + Σζ / ΣS (the flat value is the mean
    of the kept values; ΣS = √r_full ‖merge‖_F, Û V̂ᵀ having r_full orthonormal columns), to float64
    round-off of the whitened [U_1 … U_T | U_c]; the given task vectors' exact path is ≥ 10× further."""
    taus, ctx = method_case(ISO_BASE_RATIO)
    merged, _ = certified_merge("iso_cts", taus, ctx, monkeypatch)
    exact_path = run("iso_cts", taus, svd="exact")
    seen = {}

    def exact_of_perturbed(x, rank, **options):
        if x.dim() == 2:  # the common SVD: exact in both merges (cost model)
            seen["common"] = truncated_svd(x, rank, **options)
            return seen["common"]
        found = block_krylov_svd(x, rank, seed=options["seed"], allowance=options["precision"].allowance(x.shape))
        hat, zeta, gap = perturbed(x, found.factors, found.certificate.floor)
        seen.update(found=found, zeta=zeta, gap=gap, backward=(x - hat).flatten(1).norm(dim=1))
        return exact_top(hat, rank)

    monkeypatch.setattr(iso_module, "truncated_svd", exact_of_perturbed)
    with ThreadIndependent():
        replaced = run("iso_cts", taus, ctx)
    found = seen["found"]
    assert torch.allclose(seen["backward"], found.certificate.backward, rtol=1e-9)
    assert (found.certificate.share <= 0.9).all() and (seen["gap"] > 0).all()
    rescaled = merged * (1 + float(seen["zeta"].sum()) / (math.sqrt(M) * float(merged.norm())))
    bases = torch.cat([concat_factors(found.factors).U, seen["common"].U], dim=1)
    bound = round_off_bound(seen["gap"], found.factors.S, bases)
    assert relative(rescaled, replaced) <= bound
    assert relative(merged, exact_path) >= 10 * bound


@pytest.mark.parametrize("method", ["tsv", "prime", "iso_cts"])
def test_float32_outputs_keep_the_strict_residual_check(method):
    """The same task vectors written in float32: nothing is certified. Every member either fails the
    residual check (a gap-free cut: ≥ 100× above its tolerance) or is exact by the cost model, so the
    merge has the exact path's bits."""
    taus, _ = method_case()
    ctx = TensorContext("layer.weight", "matrix", seed=3, precision=precision(torch.float32, taus))
    with ThreadIndependent(), recording() as outcomes:
        merged = run(method, taus, ctx)
    with ThreadIndependent():
        exact = run(method, taus, svd="exact")
    assert outcomes.matrices("krylov") == 0 and outcomes.epsilon == 0
    assert torch.equal(merged, exact)


def gapped(tasks: int, m: int, n: int, seed: int, k: int | None = None) -> torch.Tensor:
    """m × n task vectors with a clear gap at the cut k (TSV's m/T unless given): k values from 1 down
    to 0.5 on random subspaces over a floor of spectral norm ≈ 0.1 (σ_{k+1}/θ_k ≈ 0.2), float64."""
    g = torch.Generator().manual_seed(seed)
    k, out = k or m // tasks, []
    for _ in range(tasks):
        U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
        floor = torch.randn(m, n, generator=g, dtype=torch.float64) / (math.sqrt(m) + math.sqrt(n))
        out.append((U * torch.linspace(1.0, 0.5, k, dtype=torch.float64)) @ V.mT + 0.1 * floor)
    return torch.stack(out)


def test_tsv_sums_its_members_errors_so_a_per_member_allowance_would_exceed_the_bound():
    """Where the exact path is well defined (a gap at the cut), TSV's merge from unconverged Ritz
    triplets (one Krylov step) moves the written update by Σ_t δP_t, δP_t ≈ −R_{k,t}V_tᵀ: eight terms on
    independent random row spaces, nearly Frobenius-orthogonal, so ‖Σ_t δP_t‖ ≈ (Σ_t β_t²)^½ ≈ √8·β —
    above 1.5·max_t β_t and below Σ_t β_t, each by a factor ≥ 1.5 at first order. So an allowance given
    to each member alone (the certificate's default combination, which PRIME used) accepts members
    whose merge exceeds ROUNDING_FRACTION × the output's rounding; TSV's own combination
    (:func:`summed_parts`) rejects them."""
    tasks, m, n = 8, 192, 384
    taus = gapped(tasks, m, n, 41)
    found = block_krylov_svd(taus, m // tasks, seed=3, steps=1)
    beta = found.certificate.backward
    moved = float((whitened_merge(concat_factors(found.factors))
                   - whitened_merge(concat_factors(exact_top(taus, m // tasks)))).norm())
    assert 1.5 * float(beta.max()) <= moved <= float(beta.sum())
    # an output whose allowance, ROUNDING_FRACTION × its rounding, is just above every member's β
    total = 1.05 * float(beta.max())
    rms = total / (ROUNDING_FRACTION * ROUNDING_RMS * unit_roundoff(torch.bfloat16) * math.sqrt(m * n))
    written = OutputPrecision("bfloat16", unit_roundoff(torch.bfloat16), rms)
    kept = found.factors.S.double()
    assert (written.allowance(taus.shape).share(beta, kept) <= 1).all()  # each member alone: within
    assert moved > total  # ... yet together beyond the allowance
    summed = combined(written, summed_parts(tasks, 1.0)).allowance(taus.shape)
    assert (summed.share(beta, kept) > 1).all()


def test_combinations_share_the_allowance_and_scale_by_their_gain():
    """members split the allowance equally; the gain is |α|, or |α|·hypot(level/θ_k, 1) on the smallest
    live kept value when the values are flattened (a null member's gain is |α|)."""
    written = precision(torch.bfloat16, gap_free(1))
    whole = written.allowance((M, N)).budget
    flat = combined(written, Combination(4, 2.0, level=3.0)).allowance((M, N))
    assert flat.budget == pytest.approx(whole / 4, rel=1e-12)
    kept = torch.tensor([[6.0, 1.5, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    beta = torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert torch.allclose(flat.share(beta, kept) * flat.budget,
                          torch.tensor([2.0 * math.sqrt(5.0), 2.0], dtype=torch.float64))
    summed = combined(written, summed_parts(4, -2.0)).allowance((M, N))
    assert torch.allclose(summed.share(beta, kept) * summed.budget, torch.full((2,), 2.0, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(256, 512), (512, 512), (512, 256)])
def test_the_summed_test_is_the_first_order_change_of_a_low_rank_prime_merge(shape, monkeypatch):
    """Where the exact path is well defined (a gap at the cut) and the members fill ¼ of the space
    (T·k = min(m, n)/4, PRIME's regime), PRIME's merge from Ritz triplets certified after two steps
    moves the written update by 0.9–1.1× the summed norm ‖Σ_t E_t‖_F (measured 0.98–1.08), which the
    per-member worst case, Σ_t β_t, overstates ≥ 2.5-fold (2.8). At TSV's fill (T·k = min(m, n)) the
    summed test is not taken."""
    tasks, (m, n) = 8, shape
    k = min(m, n) // (4 * tasks)
    taus = gapped(tasks, m, n, 7, k)
    ctx = TensorContext("layer.weight", "matrix", seed=3, precision=precision(torch.bfloat16, taus, 400.0))
    merged, found = certified_merge("prime", taus, ctx, monkeypatch, rank=k)
    whole = combined(ctx.precision, summed_parts(tasks, 1.0)).allowance(taus.shape)
    summed = float(found.certificate.summed[0]) * whole.budget * tasks
    with ThreadIndependent():
        moved = float((merged - run("prime", taus, svd="exact", rank=k)).norm())
    assert 0.9 * summed <= moved <= 1.1 * summed
    assert float(found.certificate.backward.sum()) >= 2.5 * summed
    assert not whole.combination.summed(4 * k, taus.shape)


def test_prime_members_taken_together_need_fewer_passes_than_each_alone(monkeypatch):
    """The summed test accepts PRIME's members (6 × 4 directions of 384) before their own shares
    would: without it (SUMMED_FILL = 0) the same merge makes more passes, each member within its share."""
    taus, ctx = method_case()
    together = certified_merge("prime", taus, ctx, monkeypatch)[1]
    monkeypatch.setattr(certificate_module, "SUMMED_FILL", 0.0)
    alone = certified_merge("prime", taus, ctx, monkeypatch)[1]
    assert together.passes < alone.passes
    assert (alone.certificate.share <= 1).all() and (together.certificate.share > 1).any()


def test_the_cost_model_expects_summed_members_in_quadrature():
    """Where the summed test is taken, a member's expected demand is (Σ_t D_t²)^½ / members when that
    is below its own D (uncorrelated errors); flattened values (Iso-CTS) and a fill above SUMMED_FILL
    keep each member's own."""
    written = precision(torch.bfloat16, gap_free(1))
    demand = torch.tensor([4.0, 4.0, 4.0, 4.0, 1.0], dtype=torch.float64)
    summed = combined(written, summed_parts(5, 1.0)).allowance((M, N))
    expected = summed.expected(demand, 4, (M, N))
    assert torch.allclose(expected, torch.tensor([1.6125] * 4 + [1.0], dtype=torch.float64), atol=1e-4)
    assert torch.equal(summed.expected(demand, M // 5, (M, N)), demand)  # fills the space: each alone
    flat = combined(written, Combination(5, 1.0, level=1.0)).allowance((M, N))
    assert torch.equal(flat.expected(demand, 4, (M, N)), demand)
