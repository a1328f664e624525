"""Recipes: what to merge, how, and with which parameters.

A recipe is YAML (or the same fields passed to :func:`primerge.merge`)::

    base: PATH                 # Hugging Face model folder or a .safetensors file
    models:                    # fine-tunes of the same architecture
      - PATH
      - {path: PATH, weight: 1.0, name: my-task}
    method: prime
    parameters: {rank: 0.01, residual: mean, alpha: 1.0}
    matrices: REGEX            # optional: 2-D parameters that get the SVD treatment, or
                               # {REGEX: matrix | experts | flatten | mean, ...} (see Recipe.layout)
    tokenizer: base            # base | union | MODEL NAME: the output vocabulary (primerge.core.vocabulary)
    task_specific: REGEX       # optional: per-task tensors kept, not merged (e.g. heads)
    seed: 42
    lines: {alpha: 0.5, beta: 0.5}   # optional LiNeS post-scaling of any method's update
    purify: {...}              # optional PAVE purification of the task vectors (primerge.purify)
    output: {lora_rank: 16}    # optional: write a PEFT LoRA adapter instead of a full model
    output: {dtype: bfloat16}  # optional: store every floating tensor in this dtype (default auto)
    execution: {backend: ray, address: auto, workers: 8}   # optional: run the units on Ray
    allow_pickle: false        # true: also read .bin/.pt pickles, with torch.load(weights_only=True)

A model may also be a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)
of the base; see :mod:`primerge.io.adapters`.

Relative paths in a YAML file are resolved against the file's folder. A model's
``weight`` multiplies its task vector before the method sees it (τ_t ← w_t τ_t).
A recipe is resolved once: validation looks the method up and validates its parameters, so an
unknown method or parameter is reported (with the closest name) before anything is read, and
the frozen recipe then carries the method's spec (:attr:`Recipe.spec`) and validated
parameters (:attr:`Recipe.params`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from primerge.core.purify_block import PurifyConfig, parse_purify
from primerge.util.errors import RecipeError
from primerge.io.user_paths import user_path
from primerge.methods import get_method
from primerge.methods.base import MethodParams, MethodSpec
from primerge.methods.lines_scaling import LinesConfig
from primerge.util.patterns import compiled
from primerge.util.schema import Regex, validate

#: docs/algorithms.md, "Conventions": 2-D tensors whose names match this are not matrix parameters.
DEFAULT_NON_MATRIX = r"embed|wte|wpe|position|lm_head|shared"
#: 3-D tensors whose names match this are fused experts [E, m, n]: E matrices (Granite/JetMoE
#: name theirs input_linear / output_linear).
DEFAULT_EXPERTS = r"expert|input_linear|output_linear"

#: How a tensor is viewed by the merge: ``matrix`` (a 2-D matrix parameter), ``experts`` (every
#: leading index of an N-D tensor (N >= 3) is one matrix of its last two axes), ``flatten`` (an N-D
#: tensor (N >= 2) as one matrix: first axis x the product of the others, e.g. a convolution
#: [out, in, kh, kw] as out x in·kh·kw) or ``mean`` (the fallback: not a matrix).
Layout = Literal["matrix", "experts", "flatten", "mean"]
OutputDtype = Literal["auto", "bfloat16", "float16", "float32"]


class ModelEntry(BaseModel):
    """One fine-tuned checkpoint; ``name`` defaults to the folder or file stem."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
    """How the merge is written: ``format`` names a registered output (:mod:`primerge.output`):
    ``model`` (default) a full model folder, ``lora`` a PEFT LoRA adapter holding the best
    rank-``lora_rank`` approximation of every merged matrix update (``lora_rank`` alone implies it).
    ``dtype`` stores every floating tensor of a model output in that dtype; ``auto`` keeps each
    tensor's stored dtype (FP8 block-scaled weights are quantized again, :mod:`primerge.io.quantized`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = "model"
    lora_rank: int | None = Field(None, ge=1, le=2**16)
    lora_task_type: str | None = None  # peft task type of a LoRA output; default: the inputs' or the base's
    dtype: OutputDtype = "auto"

    @model_validator(mode="before")
    @classmethod
    def _rank_means_lora(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("lora_rank") is not None and "format" not in value:
            return {**value, "format": "lora"}
        return value

    @model_validator(mode="after")
    def _lora_has_rank(self) -> OutputConfig:
        if self.format == "lora" and self.lora_rank is None:
            raise ValueError("format lora needs lora_rank (the adapter's rank)")
        if self.format == "lora" and self.dtype != "auto":
            raise ValueError("dtype applies to a model output; a LoRA adapter is stored as the base's floats")
        return self


class ExecutionConfig(BaseModel):
    """Where the merge runs: ``local`` (this process) or ``ray`` (units on a Ray cluster).

    For ``ray``: ``address`` joins an existing cluster (``auto`` or ``HOST:PORT``; unset starts a
    local runtime for the run), ``workers`` is how many units run at once (default: one per CPU of
    the cluster, divided by ``cpus_per_worker``), and ``gpus_per_worker`` reserves GPUs per unit
    (units then merge on CUDA).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["local", "ray"] = "local"
    address: str | None = None
    workers: int | None = Field(None, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _ray_settings_need_ray(self) -> ExecutionConfig:
        ray_only = {"address": self.address, "workers": self.workers,
                    "gpus_per_worker": self.gpus_per_worker or None}
        given = [k for k, v in ray_only.items() if v is not None]
        if self.backend == "local" and given:
            raise ValueError(f"{', '.join(given)} only apply to backend ray")
        return self


class Recipe(BaseModel):
    """A validated merge recipe (see the module docstring for the YAML form)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: Path
    models: list[ModelEntry] = Field(min_length=1)
    method: str = "prime"
    parameters: dict[str, Any] = Field(default_factory=dict)
    matrices: Regex | dict[Regex, Layout] | None = None
    task_specific: Regex | None = None
    tokenizer: str = Field("base", min_length=1)
    seed: int = Field(42, ge=0, lt=2**63)
    lines: LinesConfig | None = None
    purify: dict[str, Any] | None = None
    output: OutputConfig = Field(default_factory=OutputConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    allow_pickle: bool = Field(False, strict=True)  # opt in to .bin/.pt pickles (read weights-only): true or false

    _spec: MethodSpec = PrivateAttr()
    _params: MethodParams = PrivateAttr()
    _purify: PurifyConfig | None = PrivateAttr()

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

    @field_validator("output", "execution", mode="before")
    @classmethod
    def _default_section(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _tokenizer_names_a_source(self) -> Recipe:
        if self.tokenizer not in ("base", "union") and self.tokenizer not in self.model_labels():
            raise ValueError(f"tokenizer '{self.tokenizer}' is not base, union or a model's name "
                             f"({', '.join(self.model_labels())})")
        return self

    def model_post_init(self, context: Any) -> None:
        self._spec = get_method(self.method)
        self._params = self._spec.parameters(self.parameters)
        self._purify = None if self.purify is None else parse_purify(self)

    @property
    def spec(self) -> MethodSpec:
        """The method's registered spec."""
        return self._spec

    @property
    def params(self) -> MethodParams:
        """The method's validated parameters with defaults filled in."""
        return self._params

    @property
    def purify_config(self) -> PurifyConfig | None:
        """The validated ``purify:`` block, defaults resolved (:func:`~primerge.core.purify_block.parse_purify`)."""
        return self._purify

    @property
    def lora_rank(self) -> int | None:
        """The rank of a LoRA adapter output, or ``None`` for a full model."""
        return self.output.lora_rank if self.output.format == "lora" else None

    def replace(self, **changes: Any) -> Recipe:
        """A re-validated copy with ``changes`` applied (e.g. ``output={...}``)."""
        return validate(Recipe, {**self.model_dump(exclude_none=True), **changes}, "recipe")

    def inputs(self) -> list[Path]:
        """The base and every model: what no output may overwrite."""
        return [self.base, *(m.path for m in self.models)]

    def model_labels(self) -> list[str]:
        """Unique names of the models (``name``, else the stem; ``-2``, ``-3`` on clashes)."""
        labels: list[str] = []
        for entry in self.models:
            label, k = entry.label, 2
            while label in labels:
                label, k = f"{entry.label}-{k}", k + 1
            labels.append(label)
        return labels

    def layout(self, name: str, shape: tuple[int, ...]) -> Layout:
        """How the floating tensor ``name`` of ``shape`` is merged (patterns searched in bounded time,
        :mod:`primerge.util.patterns`).

        By default a 2-D tensor is a ``matrix`` unless its name matches :data:`DEFAULT_NON_MATRIX`,
        a 3-D tensor named like :data:`DEFAULT_EXPERTS` is ``experts``, everything else ``mean``.
        ``matrices: REGEX`` replaces the 2-D rule (2-D tensors matching it are the matrices);
        ``matrices: {REGEX: LAYOUT}`` gives the first matching pattern's layout to a tensor whose
        shape fits it (``matrix``: 2-D, ``experts``: 3-D or more, ``flatten``: 2-D or more, ``mean``:
        any) and the default rule to every other tensor.
        """
        if isinstance(self.matrices, dict):
            for pattern, layout in self.matrices.items():
                if _found(pattern, name) and _fits(layout, len(shape)):
                    return layout
        elif self.matrices is not None and len(shape) == 2:
            return "matrix" if _found(self.matrices, name) else "mean"
        if len(shape) == 2:
            return "mean" if _found(DEFAULT_NON_MATRIX, name) else "matrix"
        return "experts" if len(shape) == 3 and _found(DEFAULT_EXPERTS, name) else "mean"

    def is_task_specific(self, name: str) -> bool:
        return self.task_specific is not None and compiled(self.task_specific, "task_specific").search(name) is not None

    def to_yaml(self) -> str:
        """The recipe as YAML, effective method parameters included."""
        data = self.model_dump(mode="json", exclude_none=True)
        for key, default in (("output", OutputConfig()), ("execution", ExecutionConfig())):
            if data.get(key) == default.model_dump(mode="json", exclude_none=True):
                del data[key]
        data["parameters"] = self.params.model_dump(mode="json")
        return yaml.safe_dump(data, sort_keys=False)


def _found(pattern: str, name: str) -> bool:
    return compiled(pattern, "matrices").search(name) is not None


def _fits(layout: Layout, ndim: int) -> bool:
    """Whether a tensor of ``ndim`` axes can be merged with ``layout``."""
    return {"matrix": ndim == 2, "experts": ndim >= 3, "flatten": ndim >= 2, "mean": True}[layout]


def build_recipe(data: dict[str, Any], *, relative_to: Path | None = None) -> Recipe:
    """Validate a recipe dict, resolving relative paths against ``relative_to``; the method and
    its parameters are checked too."""
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping with at least 'base' and 'models'.")
    recipe = validate(Recipe, data, "recipe")
    if relative_to is None:
        return recipe
    models = [entry.model_copy(update={"path": _resolve(entry.path, relative_to)}) for entry in recipe.models]
    return recipe.model_copy(update={"base": _resolve(recipe.base, relative_to), "models": models})


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
