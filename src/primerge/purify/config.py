"""The recipe's ``purify:`` block (PAVE), validated with pydantic.

::

    purify:
      method: co_svd            # co_svd | asvd | svd_llm | svd
      rank_ratio: 0.9375        # ρ: preserved fraction of the rank (PAVE uses 7/8 .. 63/64)
      allocation: spectral      # spectral (PAVE Algorithm 1) | uniform (round(ρR) everywhere)
      samples: 4096             # token rows of each task's data run through its model
      data: {task-a: a.csv, task-b: rt_sentiment}   # model label -> CSV/JSONL file or packaged task

Every model of the recipe needs an entry in ``data`` unless ``method`` is ``svd`` (plain SVD
uses no activations). Problems raise :class:`primerge.errors.RecipeError` naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from primerge.errors import RecipeError, closest
from primerge.recipe import Recipe
from primerge.validation import validate

Decomposition = Literal["co_svd", "asvd", "svd_llm", "svd"]


class PurifyConfig(BaseModel):
    """PAVE settings (pave.txt Sections 3.2–3.3, Appendix A)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Decomposition = Field("co_svd", description="decomposition: co_svd | asvd | svd_llm | svd")
    rank_ratio: float = Field(15 / 16, gt=0.0, le=1.0, description="ρ: preserved rank ratio")
    allocation: Literal["spectral", "uniform"] = Field("spectral", description="rank allocation")
    samples: int = Field(4096, ge=1, description="token rows per task for the covariances")
    max_length: int = Field(64, ge=2, description="tokens per text (truncation)")
    batch_size: int = Field(32, ge=1, description="texts per forward pass")
    data: dict[str, str] = Field(default_factory=dict, description="model label -> task data")

    @property
    def floor(self) -> float:
        """γ = ρ − (1 − ρ)/2, the stopping ratio of Algorithm 1 (pave.txt Appendix A)."""
        return self.rank_ratio - (1.0 - self.rank_ratio) / 2.0

    @property
    def needs_data(self) -> bool:
        return self.method != "svd"


def parse_purify(recipe: Recipe) -> PurifyConfig:
    """Validate ``recipe.purify``; the data keys must be the recipe's model labels.

    Relative data paths are kept as given (the CLI resolves them against the recipe's folder via
    :func:`resolve_data`).
    """
    raw: dict[str, Any] = dict(recipe.purify or {})
    config = validate(PurifyConfig, raw, "purify block", prefix="purify.")
    labels = recipe.model_labels()
    for key in config.data:
        if key not in labels:
            raise RecipeError(
                f"purify.data: '{key}' is not a model of the recipe.{closest(key, labels)} "
                f"Models: {', '.join(labels)}."
            )
    if config.needs_data:
        missing = [label for label in labels if label not in config.data]
        if missing:
            raise RecipeError(
                f"purify.data: no data for model '{missing[0]}'; method {config.method} needs each "
                f"task's data (a .csv/.jsonl file or a packaged task name), or use method: svd."
            )
    return config


def resolve_data(spec: str, folder: Path | None) -> str:
    """A relative ``.csv``/``.jsonl`` path resolved against ``folder``; task names unchanged."""
    if folder is None or not spec.lower().endswith((".csv", ".jsonl")):
        return spec
    path = Path(spec).expanduser()
    return str(path if path.is_absolute() else folder / path)
