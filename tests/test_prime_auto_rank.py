"""PRIME's adaptive rank (F(r) objective): paper tables as test vectors and brute-force checks."""

from __future__ import annotations

import pytest
import torch

import primerge
from primerge.methods import get_method
from primerge.methods.base import TensorContext
from primerge.methods.prime import principal_rank
from primerge.methods.prime_rank import AutoRankPrepass, candidate_ranks, layer_terms, select_rank
from helpers import run_passes

CANDIDATES = ["1", "1%", "2%", "3%", "4%", "5%", "10%", "12.5%"]

# PRIME paper, Appendix B: the Σ_i J_i and Σ_i G_i rows of Tables 7 (T5), 8 (LLaMA-3.2-1B), 9 (3B).
TABLES = {
    "table7": ([1.8752, 7.4368, 8.4864, 9.2128, 9.7438, 10.1184, 11.552, 12.0448],
               [0.4844, 0.1775, 0.1327, 0.1058, 0.0885, 0.0774, 0.0428, 0.0336], "1"),
    "table8": ([0.0000, 0.0256, 0.0384, 0.0573, 0.0749, 0.0960, 0.2048, 0.2688],
               [0.2075, 0.1809, 0.1686, 0.1592, 0.1506, 0.1431, 0.1110, 0.0982], "2%"),
    "table9": ([0.0000, 0.032, 0.0576, 0.0767, 0.1003, 0.1280, 0.2752, 0.3648],
               [0.1940, 0.1649, 0.1539, 0.1443, 0.1358, 0.1279, 0.0962, 0.0835], "1%"),
}


@pytest.mark.parametrize("table", sorted(TABLES))
def test_selection_rule_reproduces_paper_tables(table):
    J, G, expected = TABLES[table]
    F = [j + g for j, g in zip(J, G)]
    assert CANDIDATES[select_rank(F, 0.025)] == expected


def test_selection_rule_tolerance_matters():
    F = [1.0, 1.02, 1.5]
    assert select_rank(F, 0.025) == 1  # within 2.5% of the running minimum: move up
    assert select_rank(F, 0.0) == 0


def test_candidate_set():
    c = candidate_ranks(0.01, 0.125)
    assert c[0] == 1.0 and c[1] == 0.01 and c[-1] == 0.12 and len(c) == 13
    assert candidate_ranks(0.05, 0.2) == [1.0, 0.05, 0.1, 0.15, 0.2]


def brute_force_terms(taus: torch.Tensor, r: int) -> tuple[float, float]:
    """Σ_i J_i and Σ_i G_i from explicit rank-r reconstructions of the normalised task vectors."""
    unit = [t / t.norm() for t in taus.double()]
    parts = []
    for t in unit:
        U, S, Vh = torch.linalg.svd(t, full_matrices=False)
        parts.append((U[:, :r] * S[:r]) @ Vh[:r])
    J = G = 0.0
    for i, t in enumerate(unit):
        cross = sum(float((parts[i] * parts[j]).sum()) for j in range(len(unit)) if j != i)
        J += cross**2
        G += float((t - parts[i]).norm()) ** 4
    return J, G


def test_layer_terms_match_brute_force():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(40, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 30, generator=g, dtype=torch.float64)
    taus = torch.stack([3 * shared + torch.randn(40, 30, generator=g, dtype=torch.float64) for _ in range(3)])
    taus[1] *= 5.0  # normalisation makes the scale irrelevant
    ranks = [1, 2, 5, 9]
    J, G, energy, total = layer_terms(taus, ranks, mode="exact")
    for k, r in enumerate(ranks):
        bj, bg = brute_force_terms(taus, r)
        assert J[k].item() == pytest.approx(bj, rel=1e-9)
        assert G[k].item() == pytest.approx(bg, rel=1e-9)
    assert all(G[k] > G[k + 1] for k in range(len(ranks) - 1))  # retention loss falls with r
    s = torch.linalg.svdvals(taus)  # retention spectra: cumulative σ² of the raw task vectors
    assert torch.allclose(energy, s[:, :9].square().cumsum(-1), rtol=1e-9)
    assert torch.allclose(total, taus.flatten(1).norm(dim=1).square(), rtol=1e-12)


def test_layer_terms_zero_task_vector_is_harmless():
    taus = torch.zeros(2, 10, 8, dtype=torch.float64)
    taus[0] = torch.randn(10, 8, dtype=torch.float64)
    J, G, _, _ = layer_terms(taus, [1, 2], mode="exact")
    assert torch.isfinite(J).all() and torch.isfinite(G).all()
    assert (J == 0).all()  # nothing to interfere with


def test_prepass_averages_layers_and_merge_uses_the_choice():
    g = torch.Generator().manual_seed(1)
    prepass = AutoRankPrepass(candidate_ranks(0.1, 0.3), 0.025, "exact", principal_rank)
    layers = [torch.randn(3, 20, 20, generator=g, dtype=torch.float64) for _ in range(2)]
    tensors = [(x, TensorContext(f"l{k}", "matrix")) for k, x in enumerate(layers)]
    tensors.append((torch.randn(3, 20, dtype=torch.float64), TensorContext("b", "fallback")))
    result = run_passes(prepass, tensors)
    assert result.layers == 2
    expected_J = [sum(layer_terms(x, [principal_rank(c, 20, 3)], mode="exact")[0].item() for x in layers) / 2
                  for c in result.candidates]
    assert result.J == pytest.approx(expected_J, rel=1e-9)
    r = principal_rank(result.rank, 20, 3)
    spectra = [torch.linalg.svdvals(x).square() for x in layers]
    expected_retention = sum(s[:, :r].sum(1) for s in spectra) / sum(s.sum(1) for s in spectra)
    assert result.retention == pytest.approx(expected_retention.tolist(), rel=1e-9)
    spec = get_method("prime")
    params = spec.parameters({"rank": "auto", "svd": "exact"})
    ctx = TensorContext("l0", "matrix", prepass=result)
    fixed = spec.parameters({"rank": result.rank, "svd": "exact"})
    assert torch.equal(spec.apply(layers[0], ctx, params), spec.apply(layers[0], ctx, fixed))
    assert "r* =" in result.to_markdown()


def test_auto_rank_end_to_end_records_table_in_card(bert_zoo, tmp_path):
    result = primerge.merge(bert_zoo["base"], bert_zoo["models"], "prime", rank="auto",
                            task_specific=r"^classifier\.", out=tmp_path / "auto")
    assert result.report is not None and "F(r)" in result.report
    card = (tmp_path / "auto" / "README.md").read_text()
    assert "PRIME adaptive rank: r* =" in card and "| Σ J_i |" in card


def test_f_table_shows_one_row_per_distinct_outcome_and_flags_the_grid_edge():
    from primerge.methods.prime_rank import AutoRank

    table = AutoRank([0.01, 0.02, 0.03, 0.04], J=[0.5, 0.5, 0.3, 0.2], G=[0.1, 0.1, 0.1, 0.05], layers=3,
                     tolerance=0.025)
    text = table.to_markdown()
    assert "| 1%–2% | 0.5000 | 0.1000 | 0.6000 |" in text and text.count("| 1%") == 1
    assert "| **4%** |" in text and "r* is the largest candidate (4%)" in text
    inner = AutoRank([0.01, 0.02, 0.03], J=[0.5, 0.1, 0.3], G=[0.1, 0.1, 0.1], layers=3, tolerance=0.025)
    assert "largest candidate" not in inner.to_markdown() and "| **2%** |" in inner.to_markdown()
