"""Outputs assembled from several models' tensors: layer stacks (:mod:`primerge.core.slices`) and
mixtures of experts (:mod:`primerge.core.moe`).

A plain merge writes one tensor per base tensor, under the base's name. An assembled output's
tensors are not one-to-one with the base's: each output tensor names its origin,

- a :class:`TensorRef`: tensor ``name`` of one input model, written under the output's name
  (layer 12 of model B written as layer 30; a fine-tune's ``mlp.up_proj`` written as expert 3),
  copied bit for bit unless a ``scale`` or ``noise`` is asked for;
- a :class:`Merged` tensor: θ₀ read from one base tensor and τ_t = θ_t − θ₀ from one tensor of each
  model, merged by the recipe's method (the slices that list several models; an MoE's attention
  merged from its experts' models);
- a :class:`Computed` value, known when the plan is built (an MoE router, zero biases).

The plan's base is a :class:`ComposedCheckpoint`: a read-only checkpoint whose names are the
output's and whose tensors are read from their origins; the merged models are
:class:`~primerge.core.sources.FullFineTune` sources whose names map output names to their own.
So the engine, the executors and the sinks run an assembled plan as any other: copied entries
read through the composed base, merged entries get θ₀ and τ_t through the remapped names, and a
unit stays a pure function of (plan, unit). Memory still follows the largest tensor: every input
tensor is read when its output tensor is written, once.

An assembled recipe (:class:`AssembledRecipe`) is a :class:`~primerge.core.recipe.Recipe` with its
own block (``slices:``, ``moe:``) that builds its own :class:`AssembledPlan`; ``method:
passthrough`` (the default) copies every tensor, any other method merges the tensors the block
says are merged.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor

from primerge.core.chat_templates import with_chat_template
from primerge.core.parameters import ParameterSettings, resolve_table, weights_at
from primerge.core.plan import Plan, config_changes, plan_entries, shard_units
from primerge.core.recipe import ModelEntry, Recipe
from primerge.core.sources import FullFineTune
from primerge.core.support_files import output_files
from primerge.io.adapters import is_adapter
from primerge.io.quantized import open_weights
from primerge.io.readers import Checkpoint, TensorInfo
from primerge.methods.base import MethodParams, MethodSpec, TensorContext
from primerge.methods.lines_scaling import layer_scales
from primerge.methods.stack import TaskStack
from primerge.util.errors import ExecutionError, InputError, RecipeError
from primerge.util.seeding import generator

#: the method name of an output whose every tensor is copied from one input (mergekit's name)
PASSTHROUGH = "passthrough"
#: how a recipe names its base among the inputs of its block
BASE = "base"


class NoParameters(MethodParams):
    """``passthrough`` takes no parameters."""


def _nothing_merged(taus: TaskStack, ctx: TensorContext, params: NoParameters) -> Tensor:
    raise ExecutionError(f"tensor '{ctx.name}': method passthrough copies every tensor from one model; an "
                         f"assembled plan never hands it task vectors to merge.")


#: The spec of ``method: passthrough``: not a registered merge method (it has no task vectors to
#: merge); the assembled plan copies every entry, so its function is never called.
COPY_SPEC = MethodSpec(PASSTHROUGH, "every output tensor copied from one input model", NoParameters,
                       _nothing_merged, family="elementwise")


# ------------------------------------------------------------------------------------ origins


@dataclass(frozen=True)
class TensorRef:
    """Tensor ``name`` of input ``model`` (a model's label, or ``base``). ``noise`` adds
    σ·N(0, 1) draws (seeded by ``seed``) and ``scale`` then multiplies, both in the stored dtype
    (mergekit-moe's ``noise_scale`` and ``residual_scale``, mergekit's passthrough ``scale``);
    without them the tensor is copied bit for bit."""

    model: str
    name: str
    scale: float | None = None
    noise: float | None = None
    seed: int = 0

    def applied(self, tensor: Tensor) -> Tensor:
        if self.noise:
            draws = torch.randn(tensor.shape, generator=generator(self.seed, self.model, self.name))
            tensor = tensor + draws.to(tensor.dtype) * self.noise
        if self.scale is not None and self.scale != 1.0:
            tensor = tensor * self.scale
        return tensor


class Computed(ABC):
    """An output tensor computed when the plan is built (or on first read), not read from a model."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @abstractmethod
    def load(self) -> Tensor:
        """The tensor (CPU, ``dtype``)."""

    @abstractmethod
    def describe(self) -> str:
        """What the value is, for the layer or expert map."""


@dataclass(frozen=True)
class Zeros(Computed):
    """A tensor of zeros (e.g. the attention biases an MoE architecture has and the base lacks)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self) -> Tensor:
        return torch.zeros(self.shape, dtype=self.dtype)

    def describe(self) -> str:
        return "zeros"


@dataclass(frozen=True)
class Merged:
    """An output tensor merged by the recipe's method: θ₀ from ``base``, τ_t from tensor
    ``models[label]`` of each model."""

    base: TensorRef
    models: Mapping[str, str]


Origin = TensorRef | Computed | Merged


def tensor_info(checkpoint: Checkpoint, label: str, name: str) -> TensorInfo:
    """The header of tensor ``name`` of input ``label``, refused with the fix when it has none."""
    if name not in checkpoint:
        raise InputError(f"{checkpoint.path}: '{label}' has no tensor '{name}', which the output takes from it; "
                         f"is it a model of the base's architecture?")
    return checkpoint.info(name)


class ComposedCheckpoint(Checkpoint):
    """The output's tensors under the output's names, each read from its origin (a
    :class:`TensorRef` into ``inputs`` or a :class:`Computed` value); a merged tensor reads as its θ₀.
    ``inner`` is the base as stored (its folder gives the output's support files)."""

    def __init__(self, inner: Checkpoint, inputs: Mapping[str, Checkpoint], origins: Mapping[str, Origin]):
        self.inner, self.inputs = inner, dict(inputs)
        self.refs: dict[str, TensorRef | Computed] = {n: o.base if isinstance(o, Merged) else o
                                                       for n, o in origins.items()}
        infos = {name: self._info(ref) for name, ref in self.refs.items()}
        super().__init__(inner.path, inner.folder, infos, inner.support)

    def _info(self, ref: TensorRef | Computed) -> TensorInfo:
        if isinstance(ref, Computed):
            return TensorInfo(tuple(ref.shape), ref.dtype, self.inner.path)
        return tensor_info(self.inputs[ref.model], ref.model, ref.name)

    def load(self, name: str) -> Tensor:
        ref = self.refs[name]
        if isinstance(ref, Computed):
            return ref.load()
        return ref.applied(self.inputs[ref.model].load(ref.name))

    def close(self) -> None:
        for checkpoint in self.inputs.values():
            checkpoint.close()


# ------------------------------------------------------------------------------------ recipe


class AssembledRecipe(Recipe):
    """A recipe whose output is assembled from its inputs' tensors (see the module docstring).
    ``models`` may be empty (a stack of the base's own layers); ``method`` defaults to
    ``passthrough``. What changes the base's rows or merges per task does not apply and is refused."""

    models: list[ModelEntry] = Field(default_factory=list)
    method: str = PASSTHROUGH

    @model_validator(mode="after")
    def _assembled_output(self) -> AssembledRecipe:
        refused = {"purify": self.purify is not None, "calibration": self.calibration is not None,
                   "task_specific": self.task_specific is not None, "tokenizer": self.tokenizer != BASE,
                   "output.format": self.output.format != "model"}
        given = [k for k, v in refused.items() if v]
        if given:
            raise RecipeError(f"{', '.join(given)} cannot apply to an output assembled from several models' "
                              f"tensors; drop {'them' if len(given) > 1 else 'it'}.")
        if BASE in self.model_labels():
            raise RecipeError(f"a model is named '{BASE}', which names the recipe's base; give it another "
                              f"name (models: [{{path: ..., name: ...}}]).")
        if self.method != PASSTHROUGH and self.spec.per_task:
            raise RecipeError(f"method '{self.method}' gives every task its own model, which an assembled "
                              f"output cannot hold; choose a method that merges into one model.")
        return self

    def model_post_init(self, context: Any) -> None:
        if self.method != PASSTHROUGH:
            return super().model_post_init(context)
        if self.parameters:
            raise RecipeError(f"method passthrough copies tensors and takes no parameters; drop parameters "
                              f"({', '.join(map(str, self.parameters))}) or name a method that merges.")
        self._spec = COPY_SPEC
        self._settings = ParameterSettings.build(COPY_SPEC, {}, [(label, {}) for label in self.model_labels()])
        self._params = COPY_SPEC.parameters({})
        self._purify = self._calibration = None

    @property
    def merges(self) -> bool:
        """Whether some tensors are merged by a method (rather than every one copied)."""
        return self.method != PASSTHROUGH

    def inputs_by_label(self) -> dict[str, Path]:
        """``base`` and every model's label, with their paths."""
        return {BASE: self.base, **dict(zip(self.model_labels(), (m.path for m in self.models)))}

    @abstractmethod
    def assemble(self, shard_size: int) -> AssembledPlan:
        """The plan of this output, from the inputs' headers (and, for an MoE router, the base's
        hidden states)."""


def open_inputs(recipe: AssembledRecipe) -> dict[str, Checkpoint]:
    """The base and every model, opened lazily (headers only) and keyed by label (``base`` first)."""
    opened = {}
    for label, path in recipe.inputs_by_label().items():
        if is_adapter(path):
            raise InputError(f"{path}: '{label}' is a LoRA adapter; an assembled output takes tensors from full "
                             f"models. Merge the adapter into its base first (peft's merge_and_unload).")
        opened[label] = open_weights(path, allow_pickle=recipe.allow_pickle)
    return opened


def input_config(checkpoint: Checkpoint, label: str) -> Path:
    """The ``config.json`` of an input whose architecture the output takes or rewrites."""
    if checkpoint.folder is None or not (checkpoint.folder / "config.json").is_file():
        raise InputError(f"{checkpoint.path}: '{label}' has no config.json beside its weights; an assembled "
                         f"output rewrites the model's config. Give its Hugging Face model folder.")
    return checkpoint.folder / "config.json"


# ------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class AssembledPlan(Plan):
    """A plan whose output is assembled (see the module docstring): ``architecture`` is what
    ``primerge plan`` shows of the output, ``map_section`` the model card's layer or expert map."""

    architecture: tuple[str, ...] = ()
    map_section: str = ""

    def output_lines(self) -> list[str]:
        return list(self.architecture)

    def card_sections(self) -> list[str]:
        return [self.map_section] if self.map_section else []


def parameter_count(count: int) -> str:
    """``1234567`` as ``1.23 M`` (``B`` for billions, ``k`` for thousands)."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return str(count)


def _sources(recipe: AssembledRecipe, inputs: Mapping[str, Checkpoint], origins: Mapping[str, Origin],
             names: list[str]) -> tuple[FullFineTune, ...]:
    """One source per model of the recipe, mapping the merged output names to its own tensors
    (checked to have θ₀'s shape)."""
    merged = {n: o for n, o in origins.items() if isinstance(o, Merged)}
    if not merged:
        return ()
    weights = weights_at(recipe.settings, None, names)
    sources = []
    for label, weight in zip(recipe.model_labels(), weights):
        model = inputs[label]
        for out, origin in merged.items():
            mine = tensor_info(model, label, origin.models[label])
            theirs = inputs[origin.base.model].info(origin.base.name)
            if mine.shape != theirs.shape or mine.dtype.is_floating_point != theirs.dtype.is_floating_point:
                raise InputError(f"{mine.file}: tensor '{origin.models[label]}' of '{label}' is {list(mine.shape)} "
                                 f"{mine.dtype}, but θ₀ of '{out}' ('{origin.base.name}' of '{origin.base.model}') is "
                                 f"{list(theirs.shape)} {theirs.dtype}; the models merged must share the base's "
                                 f"architecture.")
        sources.append(FullFineTune(model, label, weight, {out: o.models[label] for out, o in merged.items()}, []))
    return tuple(sources)


def assembled_plan(recipe: AssembledRecipe, inputs: Mapping[str, Checkpoint], origins: Mapping[str, Origin], *,
                   config: Mapping[tuple[str, ...], Any], notes: list[str], architecture: list[str], map_section: str,
                   shard_size: int) -> AssembledPlan:
    """The plan of an assembled output: ``origins`` (output name -> origin, in output order),
    ``config`` the output's config.json changes, ``notes`` for the pre-flight report,
    ``architecture`` its lines about the output and ``map_section`` the card's map."""
    composed = ComposedCheckpoint(inputs[BASE], inputs, origins)
    entries = [e if isinstance(origins[e.name], Merged) else dataclasses.replace(e, kind="copy", view=None)
               for e in plan_entries(recipe, composed, {})]
    names = [e.name for e in entries]
    merged = [e.name for e in entries if e.kind != "copy"]
    sources = _sources(recipe, inputs, origins, names)
    scales = layer_scales(merged, recipe.lines) if recipe.lines is not None and merged else None
    files = output_files(composed.support, None, [], None,
                         {**config_changes(recipe, composed, entries, False), **config})
    if recipe.chat_template is not None:
        files, chat = with_chat_template(files, recipe.chat_template, [(BASE, composed.support)], None)
        notes = notes + chat
    total = sum(math.prod(e.shape) for e in entries)
    lines = [*architecture, f"{len(entries)} tensors, {parameter_count(total)} parameters "
                            f"({len(merged)} tensors merged by {recipe.method}, {len(entries) - len(merged)} copied)"]
    return AssembledPlan(recipe=recipe, base=composed, sources=sources, entries=tuple(entries),
                         units=tuple(shard_units(entries, shard_size)), scales=scales, files=files, notes=tuple(notes),
                         parameters=resolve_table(recipe.settings, merged, names) if merged else None,
                         architecture=tuple(lines), map_section=map_section)
