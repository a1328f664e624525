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
from primerge.cli.main import main
from primerge.core.recipe import load_recipe

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


def test_analyze_measures_the_recipes_own_method_and_parameters(bert_zoo, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"base": str(bert_zoo["base"]), "models": [str(p) for p in bert_zoo["models"]],
                                    "task_specific": r"^classifier\.", "method": "tsv", "parameters": {"scale": 0.5}}))
    report = analyze(load_recipe(path), tmp_path / "report")
    assert report.summary["method"] == "tsv" and "`tsv`" in (tmp_path / "report" / "index.md").read_text()


def test_analyze_without_matplotlib_or_failing_midway_leaves_nothing(recipe_file, tmp_path, monkeypatch):
    import importlib.util

    from primerge.analysis import report as report_module
    from primerge.util.errors import OutputError, RecipeError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(RecipeError, match="matplotlib"):
        analyze(load_recipe(recipe_file), tmp_path / "report")
    monkeypatch.setattr(importlib.util, "find_spec", real)

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(report_module, "_write_hogsvd", broken)
    with pytest.raises(OutputError, match="disk full"):
        analyze(load_recipe(recipe_file), tmp_path / "report")
    assert list(tmp_path.iterdir()) == []  # no report folder, no temporary one


def test_per_matrix_figures_aggregate_by_layer_for_large_models():
    """200 matrices (a 40-layer model with 5 matrix types): one line per type over the layers,
    instead of 200 unreadable tick labels; a small model keeps one point per matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from primerge.analysis.figures import matrix_type, per_matrix_figure

    types = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"]
    rows = [{"tensor": f"model.layers.{i}.{t}.weight", "v": i + k} for i in range(40) for k, t in enumerate(types)]
    assert matrix_type(rows[7]["tensor"]) == ("model.layers.*.self_attn.v_proj.weight", 1)
    fig = per_matrix_figure(plt, rows, {"v": lambda r: r["v"]}, "title", "value")
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 5 and ax.get_xlabel() == "layer"
    assert list(ax.get_lines()[0].get_xdata()) == list(range(40))
    small = per_matrix_figure(plt, rows[:10], {"v": lambda r: r["v"]}, "title", "value")
    assert len(small.axes[0].get_xticklabels()) == 10
    plt.close("all")


def test_heatmap_numbers_contrast_with_their_cell():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from primerge.analysis.figures import heatmap

    fig, ax = plt.subplots()
    heatmap(ax, torch.tensor([[0.0, 1.0], [1.0, 0.0]]), ["a", "b"], "t", 0, 1)  # viridis: dark purple, yellow
    assert [t.get_color() for t in ax.texts] == ["white", "black", "black", "white"]
    plt.close(fig)
