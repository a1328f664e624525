"""Figures of the analysis report that stay readable at any model size.

Per-matrix quantities are drawn one point per matrix while a model has at most
:data:`PER_MATRIX_LIMIT` matrices; beyond that (an LLM has hundreds) they are aggregated: the x axis
is the layer index (the first number in the tensor name, as LiNeS finds blocks) and each matrix
type (the name with its layer index replaced by ``*``, e.g. ``model.layers.*.mlp.up_proj.weight``)
is one line. Heatmap numbers are black or white, whichever reads on their cell's colour.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable

import torch

from primerge.methods.lines_scaling import BLOCK_PATTERN

PER_MATRIX_LIMIT = 40


def matrix_type(name: str) -> tuple[str, int | None]:
    """(the name with its layer index replaced by ``*``, the layer index or ``None``)."""
    match = re.search(BLOCK_PATTERN, name)
    if match is None:
        return name, None
    start, end = match.span(1)
    return name[:start] + "*" + name[end:], int(match.group(1))


def by_layer(rows: list[dict], value: Callable[[dict], float]) -> dict[str, tuple[list[int], list[float]]]:
    """Per matrix type, the (layer indices, values) of the rows that belong to a layer."""
    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for row in rows:
        kind, layer = matrix_type(row["tensor"])
        if layer is not None:
            series[kind][0].append(layer)
            series[kind][1].append(value(row))
    return dict(series)


def per_matrix_figure(plt, rows: list[dict], series: dict[str, Callable[[dict], float]], title: str, ylabel: str):
    """One point per matrix (few matrices), or one line per matrix type over the layers (many)."""
    if len(rows) <= PER_MATRIX_LIMIT:
        fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(rows)), 3.6))
        for (label, value), marker in zip(series.items(), "os^"):
            ax.plot(range(len(rows)), [value(r) for r in rows], marker=marker, ms=3, label=label)
        ax.set_xticks(range(len(rows)), [r["tensor"] for r in rows], rotation=90, fontsize=6)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if len(series) > 1:
            ax.legend(fontsize=8)
        return fig
    fig, axes = plt.subplots(1, len(series), figsize=(7 * len(series), 4.2), squeeze=False)
    for ax, (label, value) in zip(axes[0], series.items()):
        for kind, (layers, values) in sorted(by_layer(rows, value).items()):
            ax.plot(layers, values, marker=".", ms=3, lw=1, label=kind.split("*")[-1].strip("."))
        ax.set_xlabel("layer")
        ax.set_ylabel(label if len(series) > 1 else ylabel)
        ax.set_title(f"{title}: {label}" if len(series) > 1 else title, fontsize=10)
        ax.legend(fontsize=6, ncol=2)
    return fig


def heatmap(ax, m: torch.Tensor, labels: list[str], title: str, vmin=None, vmax=None, cmap="viridis") -> None:
    """A labelled heatmap whose numbers contrast with their cell (relative luminance ≷ 0.5)."""
    image = ax.imshow(m.numpy(), vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            r, g, b, _ = image.cmap(image.norm(float(m[i, j])))
            luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
            ax.text(j, i, f"{float(m[i, j]):.2f}", ha="center", va="center", fontsize=7,
                    color="black" if luminance > 0.5 else "white")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
