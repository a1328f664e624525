"""``primerge analyze``: a report on a recipe's task vectors, without merging.

Tensors are streamed through the merge's plan (:func:`primerge.core.plan.build_plan`,
:meth:`primerge.core.plan.Plan.task_vectors`), one parameter at a time, in two passes: pass 1 feeds every
collector (interference, PRIME's F(r) and spectra, rank collapse of ``method``'s merge for
1..T models, sign agreement, HO-GSVD); pass 2 computes PRIME's before/after cosines at the r*
that pass 1 selected. The report folder gets ``index.md``, PNG figures (matplotlib, Agg), the
numbers as CSV files and everything in ``summary.json``. A recipe with ``purify:`` is analysed
on the purified task vectors, as the merge would see them.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from primerge.analysis.alignment import Alignment
from primerge.analysis.figures import heatmap, per_matrix_figure
from primerge.analysis.interference import Interference, cosine
from primerge.analysis.signs import EDGES, SignAgreement
from primerge.analysis.spectra import PrimeDiagnostics, RankCollapse
from primerge.engine.stream import context, resolve_device, run_prepass
from primerge.util.errors import RecipeError
from primerge.io.destination import destination
from primerge.io.manifest import Ledger
from primerge.io.writer import atomic_folder
from primerge.output.card import md_code
from primerge.core.plan import Plan, build_plan
from primerge.core.recipe import Recipe


@dataclass
class Report:
    """What :func:`analyze` wrote: the folder, the figure files and the summary numbers."""

    out: Path
    figures: list[Path] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def _update(result):
    """A method's merged update (per-task methods return an object with ``.update``)."""
    return getattr(result, "update", result)


def _subset_prepasses(plan: Plan, device, quiet: bool) -> list:
    """The method's pre-pass result for the first t models, t = 1..T (``None`` when it has none)."""
    return [run_prepass(plan.subset(t), device, quiet) for t in range(1, len(plan.sources) + 1)]


def _collect(plan: Plan, dev, quiet: bool) -> tuple:
    """Stream every mergeable tensor through the collectors (pass 1), then the matrices through
    PRIME's cosines at r* (pass 2); returns (interference, prime, collapse, signs, alignment)."""
    spec, params, T = plan.recipe.spec, plan.recipe.params, len(plan.sources)
    prepasses = _subset_prepasses(plan, dev, quiet)
    interference, prime, collapse = Interference(T), PrimeDiagnostics(T), RankCollapse(T)
    signs, alignment = SignAgreement(), Alignment()
    mergeable = plan.mergeable()
    for entry in tqdm(mergeable, desc="analyze", unit="tensor", disable=quiet):
        stack = plan.task_vectors(entry, dev)[1]
        taus = stack.dense()
        interference.observe(entry.name, taus, entry.kind == "matrix")
        if entry.kind != "matrix":
            continue
        prime.observe(taus, context(plan, entry))
        collapse.observe(entry.name, [_update(spec.apply(stack.subset(t), context(plan, entry, prepasses[t - 1]),
                                                         params)) for t in range(1, T + 1)])
        signs.observe(taus)
        alignment.observe(entry.name, taus)
    matrices = [e for e in mergeable if e.kind == "matrix"]
    if not matrices:
        raise RecipeError("the recipe has no matrix parameters to analyse; check its 'matrices' regex.")
    for entry in tqdm(matrices, desc="analyze (PRIME r*)", unit="tensor", disable=quiet):
        prime.observe_cosines(plan.task_vectors(entry, dev)[1].dense(), context(plan, entry))
    return interference, prime, collapse, signs, alignment


def analyze(recipe: Recipe, out: str | Path, *, method: str | None = None, parameters: dict | None = None,
            device: str = "cpu", quiet: bool = True, force: bool = False) -> Report:
    """Analyse the task vectors of ``recipe`` and write the report to ``out`` (see module docstring).

    The rank-collapse section measures the recipe's method with its parameters, or ``method`` with
    ``parameters`` when given. The report folder follows the merge's output rules
    (:mod:`primerge.io.destination`): never an input or inside one, written atomically with a
    manifest, ``force`` replaces only an earlier analysis report.
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise RecipeError("analyze draws its figures with matplotlib, which is not installed: "
                          "pip install 'primerge[eval]' (or matplotlib).")
    target = destination(out, recipe.inputs(), force=force, kind="analysis")
    if method is not None:
        recipe = recipe.replace(method=method, parameters=parameters or {})
    dev = resolve_device(device)
    plan = build_plan(recipe)
    if recipe.purify is not None:
        from primerge.purify import build_purifier

        plan = plan.with_transform(build_purifier(recipe, quiet=quiet))
    labels = plan.labels
    if len(labels) < 2:
        raise RecipeError("analyze needs at least two models to compare.")
    try:
        collectors = _collect(plan, dev, quiet)
    finally:
        plan.close()
    with atomic_folder(target) as folder:
        report = Report(folder)
        _write(report, labels, recipe.method, *collectors)
        Ledger(folder, kind="analysis").seal()
    moved = [target.path / p.relative_to(folder) for p in report.figures + report.tables]
    return Report(target.path, moved[:len(report.figures)], moved[len(report.figures):], report.summary)


# ----------------------------------------------------------------------------------------------
# Writing: CSV, JSON, figures, index.md
# ----------------------------------------------------------------------------------------------


def _csv(report: Report, name: str, header: list[str], rows: list[list]) -> Path:
    path = report.out / name
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    report.tables.append(path)
    return path


def _matrix_csv(report: Report, name: str, labels: list[str], m: torch.Tensor) -> Path:
    return _csv(report, name, ["", *labels], [[labels[i], *map(float, m[i].tolist())] for i in range(len(labels))])


def _save(report: Report, fig, name: str) -> Path:
    import matplotlib.pyplot as plt

    path = report.out / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    report.figures.append(path)
    return path


def _write_interference(report: Report, labels: list[str], method: str, interference, plt) -> dict:
    """Inner products and cosines of the task vectors, whole model and per matrix."""
    T = len(labels)
    g = interference.total
    cos = cosine(g)
    _matrix_csv(report, "interference_inner.csv", labels, g.abs())
    _matrix_csv(report, "interference_cosine.csv", labels, cos)
    layer_rows = interference.layer_rows()
    _csv(report, "interference_per_layer.csv", ["tensor", "mean_abs_cosine", "mean_abs_inner"],
         [[r["tensor"], r["mean_abs_cosine"], r["mean_abs_inner"]] for r in layer_rows])
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * T, 2 + 0.8 * T))
    heatmap(axes[0], g.abs(), labels, "|⟨τ_i, τ_j⟩_F| (whole model)")
    heatmap(axes[1], cos, labels, "cos(τ_i, τ_j) (whole model)", -1, 1, "coolwarm")
    _save(report, fig, "interference_matrices.png")
    fig = per_matrix_figure(plt, layer_rows, {"|cos|": lambda r: r["mean_abs_cosine"]},
                            "Task-vector interference per matrix", "mean off-diagonal |cos|")
    _save(report, fig, "interference_per_layer.png")
    return {"inner": g.tolist(), "cosine": cos.tolist(), "per_layer": layer_rows}


def _write_prime(report: Report, labels: list[str], method: str, prime, plt) -> dict:
    """PRIME's F(r) table, per-task retention at r*, and the cosines before and after PRIME."""
    T = len(labels)
    auto = prime.auto
    labels_r = [auto.label(c) for c in auto.candidates]
    _csv(report, "prime_objective.csv", ["rank", "J", "G", "F", "selected"],
         [[lab, j, gg, f, i == auto.index] for i, (lab, j, gg, f) in enumerate(zip(labels_r, auto.J, auto.G, auto.F))])
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = range(len(labels_r))
    ax.plot(x, auto.F, marker="o", label="F(r)")
    ax.plot(x, auto.J, marker=".", ls="--", label="Σ J_i (interference)")
    ax.plot(x, auto.G, marker=".", ls=":", label="Σ G_i (retention loss)")
    ax.axvline(auto.index, color="red", alpha=0.6, label=f"r* = {labels_r[auto.index]}")
    ax.set_xticks(list(x), labels_r, fontsize=8)
    ax.set_xlabel("candidate rank")
    ax.set_title(f"PRIME objective, averaged over {auto.layers} matrices")
    ax.legend(fontsize=8)
    _save(report, fig, "prime_objective.png")
    retention = prime.retention()
    _csv(report, "prime_retention.csv", ["model", "retention"], [[lab, r] for lab, r in zip(labels, retention)])
    fig, ax = plt.subplots(figsize=(max(4, 1.0 * T), 3.4))
    ax.bar(labels, retention, color="tab:blue")
    ax.set_ylim(0, 1)
    ax.set_ylabel("‖τ^[r*]‖² / ‖τ‖²")
    ax.set_title(f"Principal retention at r* = {labels_r[auto.index]}")
    ax.tick_params(axis="x", rotation=45)
    _save(report, fig, "prime_retention.png")
    before, after = prime.cosines()
    names = [*labels, "residual"]
    _matrix_csv(report, "prime_cosine_before.csv", names, before)
    _matrix_csv(report, "prime_cosine_after.csv", names, after)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.8 * (T + 1), 2 + 0.85 * (T + 1)))
    heatmap(axes[0], before, names, "before PRIME: τ_t^[r*] and mean residual", -1, 1, "coolwarm")
    heatmap(axes[1], after, names, "after PRIME: whitened blocks and P⊥ residual", -1, 1, "coolwarm")
    _save(report, fig, "prime_cosine.png")
    return {"candidates": labels_r, "J": auto.J, "G": auto.G, "F": auto.F,
                        "selected": labels_r[auto.index], "retention": dict(zip(labels, retention)),
                        "cosine_before": before.tolist(), "cosine_after": after.tolist()}


def _write_rank_collapse(report: Report, labels: list[str], method: str, collapse, plt) -> dict:
    """Stable and energy rank of the merged update per matrix and as models are added."""
    T = len(labels)
    _csv(report, "rank_collapse_layers.csv", ["tensor", "r_full", "stable_rank", "energy_rank"],
         [[r["tensor"], r["r_full"], r["stable_rank"], r["energy_rank"]] for r in collapse.layers])
    growth = collapse.growth_rows()
    _csv(report, "rank_collapse_growth.csv", ["models", "stable_rank_fraction", "energy_rank_fraction"],
         [[r["models"], r["stable_rank_fraction"], r["energy_rank_fraction"]] for r in growth])
    fig = per_matrix_figure(plt, collapse.layers, {
        "stable rank / r_full": lambda r: r["stable_rank"] / r["r_full"],
        "50%-energy rank / r_full": lambda r: r["energy_rank"] / r["r_full"],
    }, f"Rank of the merged task vector ({method}, {T} models)", "rank / r_full")
    _save(report, fig, "rank_collapse_layers.png")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot([r["models"] for r in growth], [r["stable_rank_fraction"] for r in growth], marker="o", label="stable rank")
    ax.plot([r["models"] for r in growth], [r["energy_rank_fraction"] for r in growth], marker="s",
            label="50%-energy rank")
    ax.set_xlabel("number of merged models")
    ax.set_ylabel("mean over matrices, / r_full")
    ax.set_title(f"Rank collapse as models are added ({method})")
    ax.legend(fontsize=8)
    _save(report, fig, "rank_collapse_growth.png")
    return {"layers": collapse.layers, "growth": growth}


def _write_signs(report: Report, labels: list[str], method: str, signs, plt) -> dict:
    """Sign agreement after pruning, in parameter space and in DRM's joint space."""
    fractions = signs.fractions()
    edges = EDGES.tolist()
    _csv(report, "sign_agreement.csv", ["bin_low", "bin_high", *fractions],
         [[edges[i], edges[i + 1], *(fractions[s][i] for s in fractions)] for i in range(len(edges) - 1)])
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = (edges[1] - edges[0]) / (len(fractions) + 1)
    for k, (space, values) in enumerate(fractions.items()):
        ax.bar([e + (k + 0.5) * width for e in edges[:-1]], values, width=width, label=space.replace("_", " → "))
    ax.set_xlabel("sign agreement")
    ax.set_ylabel("fraction of positions")
    ax.set_title("Sign agreement after pruning (top 20%)")
    ax.legend(fontsize=8)
    _save(report, fig, "sign_agreement.png")
    return {"edges": edges, "fractions": fractions}


def _write_hogsvd(report: Report, labels: list[str], method: str, alignment, plt) -> dict:
    """HO-GSVD generalized singular values and the alignment matrix."""
    T = len(labels)
    A = alignment.matrix()
    _matrix_csv(report, "hogsvd_alignment.csv", labels, A)
    rows = []
    for name, values in alignment.values:
        for t, lab in enumerate(labels):
            v = values[t]
            rows.append([name, lab, float(v.mean()), float(v.median()), float(v.max()),
                         int((v > 1e-3 * float(values.max())).sum())])
    _csv(report, "hogsvd_values.csv", ["tensor", "model", "mean", "median", "max", "components_above_1e-3_max"], rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    name, values = max(alignment.values, key=lambda nv: float(nv[1].square().sum()))
    for t, lab in enumerate(labels):
        axes[0].semilogy(values[t].clamp_min(1e-12).numpy(), lw=1, label=lab)
    axes[0].set_title(f"generalized singular values, {name}", fontsize=9)
    axes[0].set_xlabel("shared component (by energy)")
    axes[0].legend(fontsize=7)
    pooled = [torch.cat([v[t] for _, v in alignment.values]).clamp_min(1e-12).log10().numpy() for t in range(T)]
    axes[1].hist(pooled, bins=30, label=labels, histtype="step")
    axes[1].set_xlabel("log10 generalized singular value (all matrices)")
    axes[1].set_ylabel("count")
    axes[1].legend(fontsize=7)
    _save(report, fig, "hogsvd_values.png")
    fig, ax = plt.subplots(figsize=(2 + 1.4 * T, 1.5 + 1.2 * T))
    heatmap(ax, A, labels, "HO-GSVD alignment (higher = better aligned)")
    _save(report, fig, "hogsvd_alignment.png")
    return {"alignment": A.tolist(), "layers": len(alignment.values)}


def _write(report: Report, labels, method, interference, prime, collapse, signs, alignment) -> None:
    """Every section's CSV files and figures, ``summary.json`` and ``index.md``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary: dict = {"models": labels, "method": method}
    summary["interference"] = _write_interference(report, labels, method, interference, plt)
    summary["prime"] = _write_prime(report, labels, method, prime, plt)
    summary["rank_collapse"] = _write_rank_collapse(report, labels, method, collapse, plt)
    summary["sign_agreement"] = _write_signs(report, labels, method, signs, plt)
    summary["hogsvd"] = _write_hogsvd(report, labels, method, alignment, plt)
    report.summary = summary
    (report.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _index(report, labels, method, summary)


def _index(report: Report, labels, method, summary) -> None:
    prime = summary["prime"]
    growth = summary["rank_collapse"]["growth"]
    lines = [
        "# primerge analysis",
        "",
        f"Models: {', '.join(md_code(label) for label in labels)}. Rank-collapse method: `{method}`.",
        "",
        "## Task-vector interference",
        "![interference](interference_matrices.png)",
        "![per layer](interference_per_layer.png)",
        "",
        "## PRIME",
        f"Selected r* = **{prime['selected']}** (F(r) = Σ_i J_i + G_i averaged over matrices).",
        "",
        "| model | retention at r* |", "|---|---|",
        *(f"| {md_code(k, table=True)} | {v:.4f} |" for k, v in prime["retention"].items()),
        "",
        "![objective](prime_objective.png)", "![retention](prime_retention.png)", "![cosine](prime_cosine.png)",
        "",
        "## Rank collapse",
        "| models | stable rank / r_full | 50%-energy rank / r_full |", "|---|---|---|",
        *(f"| {r['models']} | {r['stable_rank_fraction']:.4f} | {r['energy_rank_fraction']:.4f} |" for r in growth),
        "",
        "![layers](rank_collapse_layers.png)", "![growth](rank_collapse_growth.png)",
        "",
        "## Sign agreement",
        "![signs](sign_agreement.png)",
        "",
        "## HO-GSVD",
        "![values](hogsvd_values.png)", "![alignment](hogsvd_alignment.png)",
        "",
        "Numbers: " + ", ".join(p.name for p in report.tables) + ", summary.json.",
        "",
    ]
    (report.out / "index.md").write_text("\n".join(lines))
