"""``primerge analyze`` and ``primerge select``: the report on a small zoo, the greedy selection,
the interference and sign-agreement formulas."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from primerge.analysis import analyze, greedy_select
from primerge.analysis.interference import cosine, gram
from primerge.analysis.signs import agreement, histogram
from primerge.cli import main
from primerge.recipe import load_recipe

FIGURES = ["interference_matrices.png", "interference_per_layer.png", "prime_objective.png", "prime_retention.png",
           "prime_cosine.png", "rank_collapse_layers.png", "rank_collapse_growth.png", "sign_agreement.png",
           "hogsvd_values.png", "hogsvd_alignment.png"]


def test_greedy_selection_hand_case():
    A = torch.tensor([
        [0.0, 0.2, 0.9, 0.1, 0.5],
        [0.2, 0.0, 0.7, 0.3, 0.5],
        [0.9, 0.7, 0.0, 0.0, 0.1],
        [0.1, 0.3, 0.0, 0.0, 0.9],
        [0.5, 0.5, 0.1, 0.9, 0.0],
    ])
    # pool {0, 1}: means 2 -> 0.8, 3 -> 0.2, 4 -> 0.5; pick 2; then set {0,1,2}: 3 -> 0.133, 4 -> 0.367
    assert greedy_select(A, [0, 1], [2, 3, 4], 2) == [(2, pytest.approx(0.8)), (4, pytest.approx(1.1 / 3))]
    with pytest.raises(ValueError):
        greedy_select(A, [0], [1], 2)


def test_interference_and_sign_formulas():
    taus = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]], [[-1.0, 0.0]]])
    g = gram(taus)
    assert g.tolist() == [[1, 1, -1], [1, 2, -1], [-1, -1, 1]]
    c = cosine(g)
    assert c[0, 1] == pytest.approx(2 ** -0.5) and c[0, 2] == pytest.approx(-1.0)
    values = torch.tensor([[1.0, 1.0, 2.0, 0.0], [1.0, -1.0, 3.0, 5.0], [1.0, -1.0, -4.0, 0.0]])
    a = agreement(values)  # the last position has one non-zero task and is skipped
    assert a.tolist() == pytest.approx([1.0, 2 / 3, 2 / 3])
    assert histogram(a).tolist() == [0, 0, 0, 2, 0, 0, 0, 0, 0, 1]


@pytest.fixture(scope="module")
def recipe_file(bert_zoo, tmp_path_factory):
    path = tmp_path_factory.mktemp("analysis") / "recipe.yaml"
    path.write_text(yaml.safe_dump({"base": str(bert_zoo["base"]), "models": [str(p) for p in bert_zoo["models"]],
                                    "task_specific": r"^classifier\."}))
    return path


def test_analyze_writes_every_figure(recipe_file, tmp_path):
    report = analyze(load_recipe(recipe_file), tmp_path / "report", method="ties")
    for name in FIGURES:
        path = tmp_path / "report" / name
        assert path.is_file() and path.stat().st_size > 1000, name
        assert path.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in report.figures) == sorted(FIGURES)
    index = (tmp_path / "report" / "index.md").read_text()
    assert all(f"({name})" in index for name in FIGURES)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    cos = torch.tensor(summary["interference"]["cosine"])
    assert torch.allclose(cos.diagonal(), torch.ones(3, dtype=cos.dtype))
    prime = summary["prime"]
    assert prime["selected"] in prime["candidates"]
    assert all(0 < v <= 1 for v in prime["retention"].values())
    after = torch.tensor(prime["cosine_after"])
    assert after[-1, :-1].abs().max() < 1e-4  # the projected residual is orthogonal to the principal blocks
    growth = summary["rank_collapse"]["growth"]
    assert [r["models"] for r in growth] == [1, 2, 3]
    A = torch.tensor(summary["hogsvd"]["alignment"])
    assert torch.allclose(A, A.T) and A.diagonal().abs().max() == 0 and (A[~torch.eye(3, dtype=bool)] > 0).all()
    for space, fractions in summary["sign_agreement"]["fractions"].items():
        assert sum(fractions) == pytest.approx(1.0), space
    for table in report.tables:
        assert table.stat().st_size > 0


def test_cli_analyze_and_select(recipe_file, bert_zoo, tmp_path, capsys):
    assert main(["analyze", str(recipe_file), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert "PRIME r* =" in capsys.readouterr().out
    assert main(["analyze", str(recipe_file), "--out", str(tmp_path / "r"), "--quiet"]) == 2  # not empty
    m = [str(p) for p in bert_zoo["models"]]
    code = main(["select", "--base", str(bert_zoo["base"]), "--pool", m[0], "--candidates", f"{m[1]},{m[2]}",
                 "--k", "1", "--task-specific", r"^classifier\.", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "greedy picks" in out and "1. task" in out
    assert main(["select", "--base", str(bert_zoo["base"]), "--pool", m[0], "--candidates", m[1], "--k", "2"]) == 2
