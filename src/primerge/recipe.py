"""Recipes: what to merge, how, and with which parameters.

A recipe is YAML (or the same fields passed to :func:`primerge.merge`)::

    base: PATH                 # Hugging Face model folder or a .safetensors file
    models:                    # fine-tunes of the same architecture
      - PATH
      - {path: PATH, weight: 1.0, name: my-task}
    method: prime
    parameters: {rank: 0.01, residual: mean, alpha: 1.0}
    matrices: REGEX            # optional: 2-D parameters that get the SVD treatment
    task_specific: REGEX       # optional: per-task tensors kept, not merged (e.g. heads)
    seed: 42
    lines: {alpha: 0.5, beta: 0.5}   # optional LiNeS post-scaling of any method's update
    purify: {...}              # optional PAVE purification of the task vectors (primerge.purify)
    output: {lora_rank: 16}    # optional: write a PEFT LoRA adapter instead of a full model

A model may also be a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)
of the base; see :mod:`primerge.io.adapters`.
    allow_pickle: false        # true: also read .bin/.pt pickles, with torch.load(weights_only=True)

Relative paths in a YAML file are resolved against the file's folder. A model's
``weight`` multiplies its task vector before the method sees it (τ_t ← w_t τ_t).
Validation resolves the method and its parameters, so an unknown method or
parameter is reported (with the closest name) before anything is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from primerge.errors import RecipeError
from primerge.io.names import user_path
from primerge.methods import get_method
from primerge.methods.base import MethodParams, MethodSpec
from primerge.methods.lines import LinesConfig
from primerge.patterns import checked, compiled
from primerge.validation import validate

#: ALGORITHMS.md Conventions: 2-D tensors whose names match this are not matrix parameters.
DEFAULT_NON_MATRIX = r"embed|wte|wpe|position|lm_head|shared"


class ModelEntry(BaseModel):
    """One fine-tuned checkpoint; ``name`` defaults to the folder or file stem."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    weight: float = Field(1.0, allow_inf_nan=False)
    name: str | None = None

    @field_validator("path", mode="before")
    @classmethod
    def _usable_path(cls, value: Any) -> Path:
        return user_path(value, "models: path")

    @property
    def label(self) -> str:
        return self.name or (self.path.stem if self.path.suffix else self.path.name)


class OutputConfig(BaseModel):
    """How the merge is written: a full model (default) or, with ``lora_rank``, a PEFT LoRA
    adapter holding the best rank-``lora_rank`` approximation of every merged matrix update."""

    model_config = ConfigDict(extra="forbid")

    lora_rank: int | None = Field(None, ge=1, le=2**16)


class Recipe(BaseModel):
    """A validated merge recipe (see the module docstring for the YAML form)."""

    model_config = ConfigDict(extra="forbid")

    base: Path
    models: list[ModelEntry] = Field(min_length=1)
    method: str = "prime"
    parameters: dict[str, Any] = Field(default_factory=dict)
    matrices: str | None = None
    task_specific: str | None = None
    seed: int = Field(42, ge=0, lt=2**63)
    lines: LinesConfig | None = None
    purify: dict[str, Any] | None = None
    output: OutputConfig | None = None
    allow_pickle: bool = Field(False, strict=True)  # opt in to .bin/.pt pickles (read weights-only): true or false only

    @field_validator("models", mode="before")
    @classmethod
    def _paths_to_entries(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [{"path": v} if isinstance(v, (str, Path)) else v for v in value]
        return value

    @field_validator("base", mode="before")
    @classmethod
    def _usable_base(cls, value: Any) -> Path:
        return user_path(value, "base")

    @field_validator("matrices", "task_specific")
    @classmethod
    def _valid_regex(cls, value: str | None, info) -> str | None:
        return checked(value, info.field_name)

    @property
    def lora_rank(self) -> int | None:
        """The rank of a LoRA adapter output, or ``None`` for a full model."""
        return self.output.lora_rank if self.output is not None else None

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method)

    def method_parameters(self) -> MethodParams:
        """The method's validated parameters with defaults filled in."""
        return self.spec.parameters(self.parameters)

    def model_labels(self) -> list[str]:
        """Unique names of the models (``name``, else the stem; ``-2``, ``-3`` on clashes)."""
        labels: list[str] = []
        for entry in self.models:
            label, k = entry.label, 2
            while label in labels:
                label, k = f"{entry.label}-{k}", k + 1
            labels.append(label)
        return labels

    def is_matrix_name(self, name: str) -> bool:
        """Whether a floating 2-D tensor called ``name`` is a matrix parameter (re.search)."""
        if self.matrices is not None:
            return compiled(self.matrices, "matrices").search(name) is not None
        return compiled(DEFAULT_NON_MATRIX, "matrices").search(name) is None

    def is_task_specific(self, name: str) -> bool:
        return self.task_specific is not None and compiled(self.task_specific, "task_specific").search(name) is not None

    def to_yaml(self) -> str:
        """The recipe as YAML, effective method parameters included."""
        data = self.model_dump(mode="json", exclude_none=True)
        data["parameters"] = self.method_parameters().model_dump(mode="json")
        return yaml.safe_dump(data, sort_keys=False)


def build_recipe(data: dict[str, Any], *, relative_to: Path | None = None) -> Recipe:
    """Validate a recipe dict; resolve relative paths; check the method and parameters."""
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping with at least 'base' and 'models'.")
    recipe = validate(Recipe, data, "recipe")
    if relative_to is not None:
        recipe.base = _resolve(recipe.base, relative_to)
        for entry in recipe.models:
            entry.path = _resolve(entry.path, relative_to)
    recipe.method_parameters()
    return recipe


def _resolve(path: Path, folder: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (folder / path)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    path = user_path(path, "recipe")
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror}).") from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: e.g. an integer of 5000 digits
        raise RecipeError(f"{path}: not valid YAML ({str(exc)[:200]}).") from None
    try:
        return build_recipe(data, relative_to=path.parent)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
