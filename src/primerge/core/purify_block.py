"""The recipe's ``purify:`` block (PAVE), validated with pydantic when the recipe is (so ``primerge plan``
refuses a bad block before any checkpoint is opened); :mod:`primerge.purify` runs it.

::

    purify:
      method: co_svd            # co_svd | asvd | svd_llm | svd
      rank_ratio: 0.9375        # ρ: preserved fraction of the rank (PAVE uses 7/8 .. 63/64);
                                #   unset: the authors' value for the merge method (PAPER_RANK_RATIO)
      target: weight            # weight: SVD_r(W_ft C) C⁻¹ − W₀ (the paper's Eq. 6) | delta: SVD_r(τ C) C⁻¹
      allocation: spectral      # spectral (PAVE Algorithm 1) | uniform (round(ρR) everywhere)
      tasks: [task-a]           # the models whose task vectors are purified (default: all)
      samples: 4096             # token rows of each task's data run through its model
      data: {task-a: a.csv, task-b: rt_sentiment}   # model label -> CSV/JSONL file or packaged task

Every purified model needs an entry in ``data`` unless ``method`` is ``svd`` (plain SVD uses no
activations). Problems raise :class:`primerge.util.errors.RecipeError` naming the field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from primerge.core.calibration_block import TaskDataConfig, check_labels
from primerge.util.errors import RecipeError
from primerge.util.schema import validate

if TYPE_CHECKING:
    from primerge.core.recipe import Recipe

Decomposition = Literal["co_svd", "asvd", "svd_llm", "svd"]
Target = Literal["weight", "delta"]

#: ρ per merge method in the PAVE authors' README (GitHub ABgit111/purified_task_vector,
#: GLUE/README.md: ``--rank_scale`` 0.984375 for TIES, 0.96875 for Task Arithmetic, 0.875 for
#: EMR, with the first task(s) left at 1.0, i.e. not purified).
PAPER_RANK_RATIO = {"ties": 63 / 64, "task_arithmetic": 31 / 32, "emr": 7 / 8}
#: ρ for every other method: the middle of the paper's grid {7/8, 15/16, 31/32, 63/64}.
DEFAULT_RANK_RATIO = 15 / 16


def paper_rank_ratio(method: str) -> float:
    """The authors' ρ for ``method`` (:data:`PAPER_RANK_RATIO`), else 15/16."""
    return PAPER_RANK_RATIO.get(method, DEFAULT_RANK_RATIO)


class PurifyConfig(TaskDataConfig):
    """PAVE settings (pave.txt Sections 3.2–3.3, Appendix A); the data fields are the calibration
    block's (:class:`~primerge.core.calibration_block.TaskDataConfig`)."""

    method: Decomposition = Field("co_svd", description="decomposition: co_svd | asvd | svd_llm | svd")
    rank_ratio: float | None = Field(None, gt=0.0, le=1.0,
                                     description="ρ: preserved rank ratio; unset: the authors' ρ for the method")
    target: Target = Field(
        "weight", description="what is truncated: weight W_ft (paper, Eq. 6) | delta τ = W_ft − W₀")
    allocation: Literal["spectral", "uniform"] = Field("spectral", description="rank allocation")
    tasks: list[str] | None = Field(None, description="models whose task vectors are purified (default: all)")

    @property
    def floor(self) -> float:
        """γ = ρ − (1 − ρ)/2, the stopping ratio of Algorithm 1 (pave.txt Appendix A)."""
        return self.rank_ratio - (1.0 - self.rank_ratio) / 2.0

    @property
    def needs_data(self) -> bool:
        return self.method != "svd"


def parse_purify(recipe: Recipe) -> PurifyConfig:
    """Validate ``recipe.purify``; data keys and ``tasks`` must be the recipe's model labels.

    An unset ``rank_ratio`` becomes :func:`paper_rank_ratio` of the recipe's method and unset
    ``tasks`` every model. Relative data paths were resolved against the recipe's folder when it
    was read (:func:`~primerge.core.recipe.build_recipe`).
    """
    raw: dict[str, Any] = dict(recipe.purify or {})
    config = validate(PurifyConfig, raw, "purify block", prefix="purify.")
    labels = recipe.model_labels()
    check_labels("purify", "data", config.data, labels)
    check_labels("purify", "tasks", config.tasks or [], labels)
    if config.tasks is not None and len(set(config.tasks)) != len(config.tasks):
        raise RecipeError("purify.tasks: a model is named twice.")
    config = config.model_copy(update={
        "rank_ratio": config.rank_ratio if config.rank_ratio is not None else paper_rank_ratio(recipe.method),
        "tasks": [label for label in labels if config.tasks is None or label in config.tasks],
    })
    if config.needs_data:
        missing = [label for label in config.tasks if label not in config.data]
        if missing:
            raise RecipeError(
                f"purify.data: no data for model '{missing[0]}'; method {config.method} needs each "
                f"task's data (a .csv/.jsonl file or a packaged task name), or use method: svd."
            )
    return config

