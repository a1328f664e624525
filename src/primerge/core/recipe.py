"""Recipes: what to merge, how, and with which parameters.

A recipe is YAML (or the same fields passed to :func:`primerge.merge`)::

    base: PATH                 # Hugging Face model folder or a .safetensors file
    models:                    # fine-tunes of the same architecture (or hub ids org/name[@revision])
      - PATH
      - {path: PATH, weight: 1.0, name: my-task}
      - {path: PATH, parameters: {density: 0.3, weight: [0.5, 1.0]}}   # per-model settings
    method: prime
    parameters: {rank: 0.01, residual: mean, alpha: 1.0}
                               # any value may be a gradient over depth ([0.2, 0.8]) or filtered by
                               # tensor class / name ([{filter: mlp, value: 0.3}, {value: 0.5}]):
                               # the parameter language, primerge.core.parameters
    matrices: REGEX            # optional: 2-D parameters that get the SVD treatment, or
                               # {REGEX: matrix | experts | flatten | mean, ...} (see Recipe.layout)
    tokenizer: base            # base | union | MODEL NAME: the output vocabulary (primerge.core.vocabulary),
                               # or {source: base, pad_to_multiple_of: 64}
    chat_template: chatml      # optional: auto | a named template | Jinja text (primerge.core.chat_templates)
    task_specific: REGEX       # optional: per-task tensors kept, not merged (e.g. heads)
    seed: 42
    lines: {alpha: 0.5, beta: 0.5}   # optional LiNeS post-scaling of any method's update
    purify: {...}              # optional PAVE purification of the task vectors (primerge.purify)
    calibration: {data: {...}} # each task's data, for a data-aware method (RegMean, RegMean++)
    output: {lora_rank: 16}    # optional: write a PEFT LoRA adapter instead of a full model
    output: {dtype: bfloat16}  # optional: store every floating tensor in this dtype (default auto)
    execution: {backend: ray, address: auto, workers: 8}   # optional: run the units on Ray
    allow_pickle: false        # true: also read .bin/.pt pickles, with torch.load(weights_only=True)
    allow_other_architectures: false   # true: merge models whose config.json names another architecture

A model may also be a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)
of the base; see :mod:`primerge.io.adapters`.

Relative paths in a YAML file are resolved against the file's folder. A model's
``weight`` multiplies its task vector before the method sees it (τ_t ← w_t τ_t).
A recipe is resolved once: validation looks the method up and validates its parameters, so an
unknown method or parameter is reported (with the closest name) before anything is read, and
the frozen recipe then carries the method's spec (:attr:`Recipe.spec`), its settings
(:attr:`Recipe.settings`, resolved per tensor when the plan is built) and the parameters every
tensor shares (:attr:`Recipe.params`).

:func:`load_recipe` also reads a mergekit configuration, or a model card (README.md) embedding
one or a primerge recipe in a fenced ``yaml`` block: it is translated (:mod:`primerge.core.mergekit`)
and the recipe keeps the translation's notes in ``origin``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from primerge.core.calibration_block import CalibrationConfig, parse_calibration
from primerge.core.chat_templates import check_chat_template
from primerge.core.mergekit import recipe_data
from primerge.core.parameters import ParameterSettings
from primerge.core.purify_block import PurifyConfig, parse_purify
from primerge.util.errors import RecipeError
from primerge.io.files import read_bounded
from primerge.io.hub import hub_snapshot, is_hub_id
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
OutputDtype = Literal["auto", "bfloat16", "float16", "float32", "float64"]


class ModelEntry(BaseModel):
    """One fine-tuned checkpoint; ``name`` defaults to the folder or file stem."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path = Field(validation_alias=AliasChoices("path", "model"))  # model: as mergekit writes it
    weight: float = Field(1.0, allow_inf_nan=False)
    name: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)  # this model's settings (primerge.core.parameters)

    @field_validator("path", mode="before")
    @classmethod
    def _usable_path(cls, value: Any) -> Path:
        return user_path(value, "models: path")

    @model_validator(mode="after")
    def _one_weight(self) -> ModelEntry:
        if "weight" in self.model_fields_set and "weight" in self.parameters:
            raise ValueError("weight is given twice (weight: and parameters.weight); give one")
        return self

    def settings(self) -> dict[str, Any]:
        """This model's settings, its ``weight:`` field included when given."""
        given = {"weight": self.weight} if "weight" in self.model_fields_set else {}
        return {**given, **self.parameters}

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


class TokenizerOptions(BaseModel):
    """The output vocabulary's options beside its source: ``pad_to_multiple_of`` rounds its rows up
    (the padding rows are the tokenizer source's, zero where it has none)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pad_to_multiple_of: int | None = Field(None, ge=1, le=2**16)


class Origin(BaseModel):
    """Where a translated recipe came from: its ``format`` (mergekit), ``file``, the original
    ``text`` and the ``notes`` on where primerge's semantics differ."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["mergekit"]
    file: str | None = None
    text: str = ""
    notes: list[str] = Field(default_factory=list)
    layers: int | None = Field(None, ge=1)  # the layers a whole-model mergekit slice spans, checked against the base


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
    tokenizer_options: TokenizerOptions | None = None  # written as tokenizer: {source, pad_to_multiple_of}
    chat_template: str | None = Field(None, min_length=1)
    seed: int = Field(42, ge=0, lt=2**63)
    lines: LinesConfig | None = None
    purify: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    output: OutputConfig = Field(default_factory=OutputConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    allow_pickle: bool = Field(False, strict=True)  # opt in to .bin/.pt pickles (read weights-only): true or false
    allow_other_architectures: bool = Field(False, strict=True)  # merge models whose config names another architecture
    origin: Origin | None = None  # a translated recipe's source and notes (not written by to_yaml)

    _spec: MethodSpec = PrivateAttr()
    _settings: ParameterSettings = PrivateAttr()
    _params: MethodParams = PrivateAttr()
    _purify: PurifyConfig | None = PrivateAttr()
    _calibration: CalibrationConfig | None = PrivateAttr()

    @model_validator(mode="before")
    @classmethod
    def _tokenizer_mapping(cls, data: Any) -> Any:
        """``tokenizer: {source, pad_to_multiple_of}`` as ``tokenizer`` and ``tokenizer_options``."""
        if isinstance(data, dict) and isinstance(data.get("tokenizer"), dict):
            options = dict(data["tokenizer"])
            return {**data, "tokenizer": options.pop("source", "base"), "tokenizer_options": options}
        return data

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        return None if value is None else check_chat_template(value)

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
        self._spec.check_models(len(self.models))
        self._settings = ParameterSettings.build(self._spec, self.parameters,
                                                 [(label, m.settings()) for label, m in zip(self.model_labels(), self.models)])
        self._settings.check()
        self._params = self._spec.parameters(self._settings.uniform())
        self._purify = None if self.purify is None else parse_purify(self)
        self._calibration = parse_calibration(self)

    @property
    def spec(self) -> MethodSpec:
        """The method's registered spec."""
        return self._spec

    @property
    def params(self) -> MethodParams:
        """The method's validated parameters with defaults filled in: the values every tensor shares
        (a parameter with a gradient, a filter or per-model values has its default here; the plan
        resolves it per tensor, :attr:`settings`)."""
        return self._params

    @property
    def settings(self) -> ParameterSettings:
        """The recipe's parameter settings (:mod:`primerge.core.parameters`)."""
        return self._settings

    @property
    def purify_config(self) -> PurifyConfig | None:
        """The validated ``purify:`` block, defaults resolved (:func:`~primerge.core.purify_block.parse_purify`)."""
        return self._purify

    @property
    def calibration_config(self) -> CalibrationConfig | None:
        """The validated ``calibration:`` block (:func:`~primerge.core.calibration_block.parse_calibration`)."""
        return self._calibration

    @property
    def lora_rank(self) -> int | None:
        """The rank of a LoRA adapter output, or ``None`` for a full model."""
        return self.output.lora_rank if self.output.format == "lora" else None

    def replace(self, **changes: Any) -> Recipe:
        """A re-validated copy with ``changes`` applied (e.g. ``output={...}``)."""
        models = [m.model_dump(exclude_unset=True, exclude_none=True) for m in self.models]  # unset weights stay unset
        return validate(type(self), {**self.model_dump(exclude_none=True), "models": models, **changes}, "recipe")

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
        data["parameters"] = {**self.params.model_dump(mode="json", exclude_none=True),
                              **{n: s.raw for n, s in self.settings.shared.items() if s.varies or n == "weight"}}
        data["models"] = [m.model_dump(mode="json", exclude_unset=True, exclude_none=True) for m in self.models]
        options = data.pop("tokenizer_options", None)
        if options:
            data["tokenizer"] = {"source": data["tokenizer"], **options}
        data.pop("origin", None)
        return yaml.safe_dump(data, sort_keys=False)


def _found(pattern: str, name: str) -> bool:
    return compiled(pattern, "matrices").search(name) is not None


def _fits(layout: Layout, ndim: int) -> bool:
    """Whether a tensor of ``ndim`` axes can be merged with ``layout``."""
    return {"matrix": ndim == 2, "experts": ndim >= 3, "flatten": ndim >= 2, "mean": True}[layout]


def build_recipe(data: dict[str, Any], *, relative_to: Path | None = None, download: bool = False) -> Recipe:
    """Validate a recipe dict, resolving relative paths (``base``, ``models`` and the task files of
    the ``purify`` and ``calibration`` blocks) against ``relative_to`` and hub ids that are
    no local path from the Hugging Face cache (fetched only with ``download``,
    :mod:`primerge.io.hub`); the method and its parameters are checked too."""
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping with at least 'base' and 'models'.")
    located = dict(data)
    if "base" in data:
        located["base"] = _locate(data["base"], relative_to, download, "base")[0]
    if isinstance(data.get("models"), (list, tuple)):
        located["models"] = [_located_model(m, relative_to, download) for m in data["models"]]
    for block in DATA_BLOCKS:
        if isinstance(data.get(block), dict) and isinstance(data[block].get("data"), dict):
            located[block] = {**data[block], "data": {label: resolve_data(spec, relative_to)
                                                      for label, spec in data[block]["data"].items()}}
    return validate(recipe_kind(located), located, "recipe")


#: The blocks whose ``data`` maps model labels to task data (a .csv/.jsonl file or a packaged task).
DATA_BLOCKS = ("purify", "calibration")


def resolve_data(spec: Any, folder: Path | None) -> Any:
    """A ``.csv``/``.jsonl`` task file located as ``base`` and ``models`` are (:func:`_against`); task
    names (and anything not a string) unchanged."""
    from primerge.data.tasks import is_table_spec

    if not isinstance(spec, str) or not is_table_spec(spec):
        return spec
    return str(_against(user_path(spec, "task file"), folder))


def recipe_kind(data: dict[str, Any]) -> type[Recipe]:
    """:class:`Recipe`, or the recipe of an output assembled from several models' tensors when the data
    has its block: ``slices`` (:mod:`primerge.core.slices`) or ``moe`` (:mod:`primerge.core.moe`)."""
    if "slices" in data:
        from primerge.core.slices import SliceRecipe  # builds on this module

        return SliceRecipe
    if "moe" in data:
        from primerge.core.moe import MoeRecipe  # builds on this module

        return MoeRecipe
    return Recipe


def _located_model(model: Any, folder: Path | None, download: bool) -> Any:
    """A ``models`` item with its path located; a hub id names the model by its last part."""
    entry = {"path": model} if isinstance(model, (str, Path)) else model
    key = next((k for k in ("path", "model") if isinstance(entry, dict) and k in entry), None)
    if key is None:
        return model
    path, hub_name = _locate(entry[key], folder, download, "models: path")
    return {**entry, key: path, **({"name": hub_name} if hub_name and entry.get("name") is None else {})}


def _locate(value: Any, folder: Path | None, download: bool, what: str) -> tuple[Any, str | None]:
    """(the local path of ``value``, the name of a hub id or ``None``): relative to ``folder``, or
    the cached snapshot of a hub id where no such local path exists; other values as they are."""
    if not isinstance(value, (str, Path)):
        return value, None
    local = _against(user_path(value, what), folder)
    if local.exists() or not is_hub_id(str(value)):
        return local, None
    return hub_snapshot(str(value), download=download), Path(str(value)).name


def _against(path: Path, folder: Path | None) -> Path:
    """``path`` relative to ``folder`` (the recipe's), unless it is absolute or there is no folder."""
    return path if path.is_absolute() or folder is None else folder / path


def load_recipe(path: str | Path, *, download: bool = False) -> Recipe:
    """Read and validate a recipe file: primerge's YAML, a mergekit configuration or a model card
    embedding either (:func:`primerge.core.mergekit.recipe_data`)."""
    path = user_path(path, "recipe")
    data = recipe_data(read_bounded(path, "recipe", "recipe", RecipeError), path)
    try:
        return build_recipe(data, relative_to=path.parent, download=download)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
