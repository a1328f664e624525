"""HO-GSVD alignment and expert selection (SB paper Section 4.2, Eq. 7; Section 5.3, Table 5).

Per matrix parameter the task vectors are decomposed with a shared space
(:func:`primerge.methods.ho_gsvd.shared_side_gsvd`); the alignment matrix averages
|log((σ_i,p + ε)/(σ_j,p + ε))| over components and layers (higher = better aligned: the two rely
on different directions). Expert selection greedily adds, from the candidates, the model with the
highest mean alignment to the current set (the pre-selected pool plus the picks so far).
"""

from __future__ import annotations

from collections.abc import Sequence


from torch import Tensor

from primerge.methods.ho_gsvd import PI, alignment_matrix, shared_side_gsvd


class Alignment:
    """Collects generalized singular values per matrix parameter."""

    def __init__(self, pi: float = PI) -> None:
        self.pi = pi
        self.values: list[tuple[str, Tensor]] = []

    def observe(self, name: str, taus: Tensor) -> None:
        dec, _ = shared_side_gsvd(taus, self.pi)
        self.values.append((name, dec.S.double().cpu()))

    def matrix(self) -> Tensor:
        return alignment_matrix([v for _, v in self.values])


def greedy_select(alignment: Tensor, pool: Sequence[int], candidates: Sequence[int], k: int
                  ) -> list[tuple[int, float]]:
    """Pick ``k`` candidates one at a time, each maximising its mean alignment with the current
    set (pool + earlier picks); ties go to the earlier candidate. Returns (index, score) pairs."""
    if k > len(candidates):
        raise ValueError(f"cannot pick {k} experts from {len(candidates)} candidates")
    chosen = list(pool)
    left = list(candidates)
    picks: list[tuple[int, float]] = []
    for _ in range(k):
        def score(c: int) -> float:
            return float(alignment[c, chosen].mean()) if chosen else 0.0
        best = max(left, key=lambda c: (score(c), -left.index(c)))
        picks.append((best, score(best)))
        chosen.append(best)
        left.remove(best)
    return picks


def candidate_scores(alignment: Tensor, pool: Sequence[int], candidates: Sequence[int]) -> dict[int, float]:
    """Mean alignment of each candidate with the pool alone."""
    return {c: float(alignment[c, list(pool)].mean()) if pool else 0.0 for c in candidates}




def pool_alignment(base, models: Sequence, *, task_specific: str | None = None, matrices: str | None = None,
                   pi: float = PI, device: str = "cpu", quiet: bool = True) -> tuple[list[str], Tensor]:
    """Alignment matrix of ``models`` (fine-tunes of ``base``), streamed through the engine's plan."""
    from tqdm.auto import tqdm

    from primerge.engine.stream import resolve_device
    from primerge.core.plan import build_plan
    from primerge.core.recipe import build_recipe

    recipe = build_recipe({"base": base, "models": [str(m) for m in models], "method": "task_arithmetic",
                           "task_specific": task_specific, "matrices": matrices})
    plan = build_plan(recipe)
    dev = resolve_device(device)
    collector = Alignment(pi)
    try:
        for entry in tqdm([e for e in plan.entries if e.kind == "matrix"], desc="HO-GSVD", unit="tensor",
                          disable=quiet):
            collector.observe(entry.name, plan.task_vectors(entry, dev)[1].dense())
    finally:
        plan.close()
    if not collector.values:
        from primerge.util.errors import RecipeError

        raise RecipeError("no matrix parameters to compare; check --matrices.")
    return recipe.model_labels(), collector.matrix()
