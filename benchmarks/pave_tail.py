"""What PAVE purification removes from each task vector of the demo zoo, per target.

For every purified matrix of the six demo fine-tunes (the cached zoo, covariances and
decompositions of ``primerge demo --pave``): ‖τ′ − τ‖ / ‖τ‖ and the mean pairwise cosine of the
removed parts τ′ − τ across tasks, summarised per matrix kind (FFN: ``intermediate`` and the FFN
``output.dense``; attention and the pooler: the rest), at the authors' ρ for PRIME (15/16) and
TIES (63/64). Run: ``python benchmarks/pave_tail.py`` (minutes once the demo's caches exist).
"""

from __future__ import annotations

import statistics

import torch

from primerge.data.tasks import DEFAULT_TASKS
from primerge.evaluation.demo import build_zoo, load_splits
from primerge.evaluation.model import HEAD_REGEX
from primerge.io.readers import open_checkpoint
from primerge.purify.pave import build_purifier
from primerge.core.recipe import build_recipe


def kind(name: str) -> str:
    return "ffn" if "intermediate" in name or ("output.dense" in name and "attention" not in name) else "attn"


def removed_parts(purifier, labels, base, models, name: str) -> tuple[list[float], list[float]]:
    """‖τ′ − τ‖ / ‖τ‖ per task and the pairwise cosines of τ′ − τ for one matrix."""
    w0 = base.load(name).float()
    taus = [m.load(name).float() - w0 for m in models]
    removed = [purifier(label, name, w0, tau) - tau for label, tau in zip(labels, taus)]
    ratios = [r.norm().item() / t.norm().item() for r, t in zip(removed, taus)]
    cosines = [torch.nn.functional.cosine_similarity(removed[i].flatten(), removed[j].flatten(), dim=0).item()
               for i in range(len(removed)) for j in range(i + 1, len(removed))]
    return ratios, cosines


def main() -> None:
    torch.set_num_threads(1)
    splits = load_splits(DEFAULT_TASKS)
    zoo = build_zoo(splits, log=lambda m: None)
    data = {s.name: str(t) for s, t in zip(splits, DEFAULT_TASKS)}
    base = open_checkpoint(zoo.base)
    models = [open_checkpoint(p) for p in zoo.paths]
    for method in ("prime", "ties"):
        for target in ("weight", "delta"):
            recipe = build_recipe({"base": str(zoo.base), "models": [str(p) for p in zoo.paths], "method": method,
                                   "task_specific": HEAD_REGEX, "purify": {"data": data, "target": target}})
            purifier = build_purifier(recipe)
            stats: dict[str, list[tuple[float, float, float, float]]] = {}
            for name in sorted({n for _, n in purifier.ranks}):
                ratios, cosines = removed_parts(purifier, recipe.model_labels(), base, models, name)
                stats.setdefault(kind(name), []).append(
                    (statistics.mean(ratios), min(ratios), max(ratios), statistics.mean(cosines)))
            for group, rows in stats.items():
                print(f"{method} ρ={purifier.config.rank_ratio:.4g} {target:6} {group}: ‖τ′−τ‖/‖τ‖ mean "
                      f"{statistics.mean(r[0] for r in rows):.2f} (range {min(r[1] for r in rows):.2f}–"
                      f"{max(r[2] for r in rows):.2f}), mean pairwise cosine of the removed parts "
                      f"{statistics.mean(r[3] for r in rows):.2f} over {len(rows)} matrices")


if __name__ == "__main__":
    main()
