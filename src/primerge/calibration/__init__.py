"""Data-aware merging: the input Gram matrices of every linear layer on each task's data, for a
method registered with ``reads_grams`` (RegMean, RegMean++; :mod:`primerge.methods.regmean`).

:func:`build_grams` turns a recipe's ``calibration:`` block into the plan's
:data:`~primerge.core.plan.InputGrams` (``plan.with_grams``), which the engine hands to the method
as ``ctx.grams``: RegMean's from PAVE's cached data pass through each model
(:func:`~primerge.calibration.grams.own_grams`), RegMean++'s from a pass through the merged model,
stage by stage (:func:`~primerge.calibration.merged.merged_grams`).

Floors: beside the engine and purify (it runs the engine's merge of one tensor and PAVE's data
pass), below the API; methods never import it.
"""

from __future__ import annotations

from pathlib import Path

from primerge.calibration.grams import GramFiles, own_grams
from primerge.calibration.merged import merged_grams
from primerge.core.plan import Plan


def build_grams(plan: Plan, *, cache: Path | None = None,
                quiet: bool = True) -> GramFiles:
    """The Gram matrices ``plan``'s method reads: through each model (``own``) or through the
    merged model (``merged``), on each model's task texts (``calibration.data``)."""
    if plan.recipe.spec.reads_grams == "merged":
        return merged_grams(plan, cache=cache, quiet=quiet)
    return own_grams(plan, cache=cache)


__all__ = ["GramFiles", "build_grams"]
