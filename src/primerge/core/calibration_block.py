"""Each task's data for a merge: what the ``calibration:`` block of a data-aware method (RegMean,
RegMean++) and the ``purify:`` block (PAVE, :mod:`primerge.core.purify_block`) share, validated with
the recipe so ``primerge plan`` refuses a bad block before any checkpoint is opened.

::

    method: regmean
    calibration:
      data: {task-a: a.csv, task-b: rt_sentiment}   # model label -> CSV/JSONL file or packaged task
      samples: 4096             # token rows of each task's training texts run through the models
      max_length: 64            # tokens per text (truncation)
      batch_size: 32            # texts per forward pass
      template: "Review: {text}\\nAnswer:"   # optional: each text as this prompt (or model label -> prompt)

A method that reads its inputs' Gram matrices (registered with ``reads_grams``) needs the block
with an entry for every model; a method that reads no data leaves it unused (so one recipe serves
``primerge tune`` over data-aware and data-free methods alike), but it is validated all the same.
The texts are each task's training split (:func:`task_texts`), so the test split is never read. A
``template`` (one for every model, or one per model label; a model without one reads its raw texts)
runs each text as the prompt the model is used with, the text cut at a word end so the prompt has
at most ``max_length`` tokens (:func:`primerge.data.prompts.fit_text`). Problems raise
:class:`primerge.util.errors.RecipeError` naming the field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from primerge.data.prompts import TEXT_FIELD
from primerge.util.errors import RecipeError, closest
from primerge.util.schema import validate

if TYPE_CHECKING:
    from primerge.methods.base import MethodSpec
    from primerge.core.recipe import Recipe


class TaskDataConfig(BaseModel):
    """Which data each model's task is, and how much of it is run through the models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: int = Field(4096, ge=1, description="token rows per task run through the models")
    max_length: int = Field(64, ge=2, description="tokens per text (truncation)")
    batch_size: int = Field(32, ge=1, description="texts per forward pass")
    data: dict[str, str] = Field(default_factory=dict, description="model label -> task data")


class CalibrationConfig(TaskDataConfig):
    """The ``calibration:`` block of a data-aware method (module docstring)."""

    template: str | dict[str, str] | None = Field(
        None, description="a prompt with one {text} field each text runs as: one for every model, or model label -> "
                          "prompt (the text cut at a word end so the prompt has at most max_length tokens)")

    def template_for(self, label: str) -> str | None:
        """Model ``label``'s prompt template, None for its raw texts."""
        return self.template.get(label) if isinstance(self.template, dict) else self.template


def block_for(spec: MethodSpec, data: Mapping[str, str], **settings: Any) -> dict | None:
    """The ``calibration:`` block a merge with ``spec`` needs: each model's task (model label -> a
    packaged task name or a .csv/.jsonl file; its *training* texts are read, never its test split)
    and ``settings`` (e.g. the LLM track's prompt templates), when the method reads its inputs'
    Gram matrices (``spec.reads_grams``: RegMean, RegMean++); None for a method that reads no data."""
    return {"data": dict(data), **settings} if spec.reads_grams is not None else None


def check_labels(block: str, field: str, keys: Iterable[str], labels: list[str]) -> None:
    """Every key names a model of the recipe, else a RecipeError on ``<block>.<field>``."""
    for key in keys:
        if key not in labels:
            raise RecipeError(
                f"{block}.{field}: '{key}' is not a model of the recipe.{closest(key, labels)} "
                f"Models: {', '.join(labels)}."
            )


def parse_calibration(recipe: Recipe) -> CalibrationConfig | None:
    """The validated ``calibration:`` block (None when the recipe has none); data for every model.

    A method registered with ``reads_grams`` needs the block (module docstring)."""
    spec = recipe.spec
    if recipe.calibration is None:
        if spec.reads_grams is not None:
            raise RecipeError(
                f"method '{spec.name}' solves for each matrix from its inputs on every task's data; add "
                f"calibration: {{data: {{<model>: <file.csv|file.jsonl|task name>, ...}}}} to the recipe.")
        return None
    raw: dict[str, Any] = dict(recipe.calibration)
    config = validate(CalibrationConfig, raw, "calibration block", prefix="calibration.")
    labels = recipe.model_labels()
    check_labels("calibration", "data", config.data, labels)
    missing = [label for label in labels if label not in config.data]
    if missing:
        raise RecipeError(f"calibration.data: no data for model '{missing[0]}'; the block names each model's "
                          "task data (a .csv/.jsonl file or a packaged task name).")
    templates = config.template if isinstance(config.template, dict) else {"": config.template or TEXT_FIELD}
    check_labels("calibration", "template", (k for k in templates if k), labels)
    for label, template in templates.items():
        if TEXT_FIELD not in template:
            where = f"calibration.template.{label}" if label else "calibration.template"
            raise RecipeError(f"{where}: {template[:60]!r} has no {TEXT_FIELD} field; write where the text goes, "
                              f"e.g. 'Review: {TEXT_FIELD}\\nAnswer:'.")
    return config


def task_texts(spec: str) -> list[str]:
    """The training texts of the task ``spec`` (a file, relative to the working folder once the recipe
    is read (:func:`~primerge.core.recipe.build_recipe` resolves it against the recipe's folder), or a
    packaged task)."""
    from primerge.data.tasks import load_task

    return list(load_task(spec).split().train_texts)
