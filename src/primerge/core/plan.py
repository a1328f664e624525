"""recipe -> :class:`Plan`: everything a merge needs to know before reading a single tensor.

The plan is checked once, from the headers: the base and every model opened lazily (quantized
formats dequantized or refused, :mod:`primerge.io.quantized`) and aligned with the base
(:mod:`primerge.core.sources`: names, tied embeddings; :mod:`primerge.core.vocabulary`: token rows),
one :class:`~primerge.core.sources.PlanEntry` per output tensor with its treatment
(:mod:`primerge.core.treatments`: ``matrix``, ``experts``, ``reshaped``, ``fallback``, ``copy``) and
stored format, LiNeS scales, the output's support files (:mod:`primerge.core.support_files`), and a
deterministic partition of the entries into :class:`~primerge.core.units.WorkUnit` s — the tensors
of one output shard each, in base order (:mod:`primerge.core.units`). Executing a unit
is a pure function of (plan, unit, pre-pass result), which is what lets units run on any worker.
A plan holds only checkpoint metadata (readers open files per read), so it can be pickled and
sent to a remote worker.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from primerge.util.errors import InputError, RecipeError
from primerge.io.adapters import is_adapter
from primerge.io.quantized import Fp8Blocks, Fp8Checkpoint, open_weights, read_config
from primerge.io.readers import Checkpoint
from primerge.io.writer import DEFAULT_SHARD_SIZE
from primerge.methods.base import MethodParams
from primerge.methods.lines_scaling import layer_scales
from primerge.methods.stack import TaskStack
from primerge.core.chat_templates import with_chat_template
from primerge.core.parameters import (ParameterTable, TensorParameters, block_count, filter_notes, resolve_table,
                                      weights_at)
from primerge.core.architectures import check_architecture
from primerge.core.recipe import Recipe
from primerge.core.support_files import OutputFile, output_files
from primerge.core.sources import (
    TREATMENTS,
    FullFineTune,
    PlanEntry,
    TaskVectorSource,
    TaskVectorTransform,
    open_source,
    read_stack,
    read_sum,
)
from primerge.core.tensor_names import input_embedding
from primerge.core.treatments import classify
from primerge.core.units import WorkUnit, shard_units
from primerge.core.vocabulary import VocabularyAlignment, align_vocabulary

#: the plan's treatments, in the order reports list them
#: (tensor name) -> the (T, n, n) float64 Gram matrices of the tensor's inputs on each model's data,
#: in model order, or ``None`` where the data did not reach it (:mod:`primerge.calibration`).
InputGrams = Callable[[str], Tensor | None]

@dataclass(frozen=True)
class Plan:
    """The checked merge: recipe (method spec and parameters resolved), base, sources, entries,
    units, the optional task-vector ``transform`` and LiNeS ``scales``; the ``vocabulary``
    alignment, the output's support ``files`` and ``notes`` on what was reconciled."""

    recipe: Recipe
    base: Checkpoint
    sources: tuple[TaskVectorSource, ...]
    entries: tuple[PlanEntry, ...]
    units: tuple[WorkUnit, ...]
    transform: TaskVectorTransform | None = None
    scales: dict[str, float] | None = None  # LiNeS λ(ℓ) per mergeable tensor, when asked for
    vocabulary: VocabularyAlignment | None = None
    files: tuple[OutputFile, ...] = ()
    notes: tuple[str, ...] = ()
    grams: InputGrams | None = None  # a data-aware method's input Gram matrices (ctx.grams)
    parameters: ParameterTable | None = None  # resolved per tensor (primerge.core.parameters)

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.sources]

    def input_files(self) -> list[tuple[str, list[Path]]]:
        """Every file the merge reads, per input: ("base", its weight and support files), then
        (label, that model's files) for each model."""
        base = {self.base.info(n).file for n in self.base.names} | set(self.base.support)
        return [("base", sorted(base)), *((s.label, sorted(set(s.files()))) for s in self.sources)]

    def output_lines(self) -> list[str]:
        """What ``primerge plan`` says of an output whose architecture is not the base's (an
        assembled plan: :mod:`primerge.core.assembly`); nothing for a merge of the base's tensors."""
        return []

    def card_sections(self) -> list[str]:
        """The model card's sections on the output's architecture (an assembled plan's layer or expert map)."""
        return []

    def close(self) -> None:
        """Release every checkpoint's cached tensors."""
        self.base.close()
        for s in self.sources:
            s.close()

    def mergeable(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.kind != "copy"]

    def counts(self) -> dict[str, int]:
        """Entries per treatment, the task-specific tensors of all models, the matrices inside
        ``experts`` tensors and the vocabulary tensors whose rows are aligned by token string."""
        counts = dict.fromkeys(TREATMENTS, 0)
        for e in self.entries:
            counts[e.kind] += 1
        counts["task_specific"] = sum(len(s.task_specific) for s in self.sources)
        counts["expert_matrices"] = sum(e.view[0] for e in self.entries if e.kind == "experts")
        aligned = self.vocabulary is not None and self.vocabulary.aligned
        counts["vocab_aligned"] = len(self.vocabulary.tensors) if aligned else 0
        return counts

    def copied(self, entry: PlanEntry) -> tuple[Tensor, dict[str, Tensor]]:
        """A ``copy`` entry's stored value and companions: as the base stores it when the output keeps
        its format, else the base's value in the output's format."""
        stored = getattr(self.base, "stored", None)
        if entry.storage is not None and stored is not None:
            tensors = stored(entry.name)
            return tensors.pop(entry.name), tensors
        value = self.base.load(entry.name)
        if value.dtype == entry.dtype:
            return value, {}
        return entry.store(value.float())

    def subset(self, tasks: int) -> Plan:
        """The same plan restricted to the first ``tasks`` models."""
        return dataclasses.replace(self, sources=self.sources[:tasks])

    def with_transform(self, transform: TaskVectorTransform | None) -> Plan:
        """The same plan with every task vector passed through ``transform`` (e.g. PAVE)."""
        return dataclasses.replace(self, transform=transform)

    def with_grams(self, grams: InputGrams | None) -> Plan:
        """The same plan with the input Gram matrices a data-aware method reads (``ctx.grams``)."""
        return dataclasses.replace(self, grams=grams)

    def tensor_parameters(self, entry: PlanEntry) -> TensorParameters:
        """The method's parameters and the models' weights ``entry`` is merged with (resolved when the
        plan was built; the recipe's and the models' own for a plan without a table)."""
        if self.parameters is None or entry.name not in self.parameters.index:
            return TensorParameters(self.recipe.params, tuple(s.weight for s in self.sources))
        found = self.parameters.of(entry.name)
        return dataclasses.replace(found, weights=found.weights[:len(self.sources)])

    @property
    def method_params(self) -> MethodParams:
        """The parameters every mergeable tensor shares (build_plan refuses a pre-pass method whose
        parameters differ between tensors): what the pre-pass is built from and the card reports."""
        if self.parameters is None or not self.parameters.distinct:
            return self.recipe.params
        return self.parameters.distinct[0].params

    def reported_parameters(self) -> dict[str, Any]:
        """The method's parameters as the card and the results report them: :attr:`method_params`,
        with ``per tensor`` for those that vary over tensors (:meth:`parameter_rows` gives their values)."""
        varying = set(self.recipe.settings.varies_over_tensors())
        return {n: ("per tensor" if n in varying else v) for n, v in self.method_params.model_dump(mode="json").items()}

    def parameter_rows(self) -> list[str]:
        """The resolved values of the parameters that vary, per tensor class and blocks
        (:meth:`primerge.core.parameters.ParameterTable.rows`); empty when nothing varies."""
        return self.parameters.rows([e.name for e in self.entries]) if self.parameters is not None else []

    def task_vectors(self, entry: PlanEntry, device: torch.device, *, summed: bool = False,
                     weighted: bool = True) -> tuple[torch.Tensor, TaskStack]:
        """θ₀ (float32) and the weighted task vectors of ``entry`` (only their sum with ``summed``;
        the models' weights left to the method when not ``weighted``), with the weights resolved for it."""
        read = read_sum if summed else read_stack
        weights = self.tensor_parameters(entry).weights
        return read(self.base, self.sources, entry, device, self.transform, weighted, weights)


def open_sources(recipe: Recipe, base: Checkpoint, labels: list[str]) -> tuple[TaskVectorSource, ...]:
    """Every model opened and checked against the base; the problems of all models in one error."""
    sources, problems = [], []
    weights = weights_at(recipe.settings, input_embedding(base.names), base.names)  # the weight of a model's rows
    for entry, label, weight in zip(recipe.models, labels, weights):
        try:
            sources.append(open_source(base, entry.path, label, weight, allow_pickle=recipe.allow_pickle,
                                       is_task_specific=recipe.is_task_specific))
            if isinstance(sources[-1], FullFineTune):
                check_architecture(base, sources[-1].checkpoint, label, recipe.allow_other_architectures)
        except InputError as exc:
            problems.append(str(exc))
    if len(problems) > 1:
        raise InputError(f"{len(problems)} models cannot be merged with this base:\n" +
                         "\n".join(f"  - {p}" for p in problems))
    if problems:
        raise InputError(problems[0])
    return tuple(sources)


def stored_as(recipe: Recipe, dtype: torch.dtype, scheme: Fp8Blocks | None) -> tuple[torch.dtype, Fp8Blocks | None]:
    """The output dtype and quantized format of a base tensor stored as ``dtype`` (``scheme``: FP8
    blocks): ``output.dtype`` for floating tensors, else as stored (FP8 quantized again in a
    model folder; bfloat16 values in a LoRA adapter)."""
    if not dtype.is_floating_point:
        return dtype, None
    if recipe.output.dtype != "auto":
        return getattr(torch, recipe.output.dtype), None
    if scheme is not None:
        return (scheme.dtype, scheme) if recipe.output.format == "model" else (torch.bfloat16, None)
    return dtype, None


def config_changes(recipe: Recipe, base: Checkpoint, entries: list[PlanEntry], quantized: bool
                   ) -> dict[tuple[str, ...], Any]:
    """config.json changes the stored formats ask for: the dtype of ``output.dtype``, and no
    ``quantization_config`` once FP8 weights are written as floats."""
    config = read_config(base.folder)
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    changes: dict[tuple[str, ...], Any] = {}
    dequantized = quantized and not any(e.storage for e in entries)
    if dequantized:
        changes[("quantization_config",)] = None
    if recipe.output.dtype != "auto" or dequantized:
        dtype = recipe.output.dtype if recipe.output.dtype != "auto" else "bfloat16"
        changes.update({(k,): dtype for k in keys})
    return changes


def plan_entries(recipe: Recipe, base: Checkpoint, schemes: dict[str, Fp8Blocks]) -> list[PlanEntry]:
    """One entry per base tensor: treatment, view and stored format."""
    entries = []
    for name in base.names:
        info = base.info(name)
        kind, view = classify(recipe, name, info.shape, info.dtype)
        dtype, storage = stored_as(recipe, info.dtype, schemes.get(name))
        entries.append(PlanEntry(name, kind, info.shape, dtype, view, storage))
    if recipe.spec.per_task and any(e.storage for e in entries):
        raise RecipeError(f"method '{recipe.method}' rebuilds every task's weights from the unified model, "
                          f"which FP8 storage would round twice; add output: {{dtype: bfloat16}}.")
    return entries


def _support(sources: tuple[TaskVectorSource, ...]) -> list[list]:
    return [s.checkpoint.support if isinstance(s, FullFineTune) else [] for s in sources]


def build_plan(recipe: Recipe, *, shard_size: int = DEFAULT_SHARD_SIZE) -> Plan:
    """Open every checkpoint lazily and check it against the base; no tensor is read (except the
    heads a model may store as tied duplicates, compared with its embedding)."""
    if hasattr(recipe, "assemble"):  # an output assembled from several models' tensors: primerge.core.assembly
        return recipe.assemble(shard_size)
    if is_adapter(recipe.base):
        raise InputError(f"{recipe.base}: the base is a LoRA adapter; give the full base model it "
                         f"was trained on (its base_model_name_or_path).")
    base = open_weights(recipe.base, allow_pickle=recipe.allow_pickle)
    schemes = base.schemes if isinstance(base, Fp8Checkpoint) else {}
    labels = recipe.model_labels()
    opened = open_sources(recipe, base, labels)
    padding = recipe.tokenizer_options.pad_to_multiple_of if recipe.tokenizer_options else None
    base, sources, vocabulary = align_vocabulary(recipe.tokenizer, base, opened, labels, padding)
    if vocabulary.changed and recipe.output.format != "model":
        raise RecipeError(f"tokenizer: {recipe.tokenizer} changes the vocabulary rows, which a "
                          f"{recipe.output.format} output of the base cannot carry; write a model folder.")
    entries = plan_entries(recipe, base, schemes)
    scales = None
    if recipe.lines is not None:
        scales = layer_scales([e.name for e in entries if e.kind != "copy"], recipe.lines)
    out = vocabulary.out if vocabulary.changed else None
    chosen = opened[labels.index(recipe.tokenizer)] if recipe.tokenizer in labels and out is not None else None
    files = output_files(base.support, out, _support(opened), chosen.checkpoint.support if chosen else None,
                         config_changes(recipe, base, entries, bool(schemes)))
    notes = tuple(n for s in opened for n in (f"{s.label}: {x}" for x in s.notes)) + vocabulary.notes
    if recipe.chat_template is not None:
        tokens = vocabulary.out.tokens if vocabulary.out is not None else None
        files, chat = with_chat_template(files, recipe.chat_template, [("base", base.support), *zip(labels, _support(opened))],
                                         tokens)
        notes += tuple(chat)
    _check_layers(recipe, base.names)
    merged = [e.name for e in entries if e.kind != "copy"]
    table = resolve_table(recipe.settings, merged, base.names)
    _one_set_for_prepass(recipe, table)
    notes += tuple(filter_notes(recipe.settings, merged))
    if schemes:
        written = next(e for e in entries if e.name in schemes)
        stored = "FP8 again (the base's blocks)" if written.storage else str(written.dtype)
        notes += (f"base: {len(schemes)} FP8 block-scaled weights dequantized for the merge, written as "
                  f"{stored.removeprefix('torch.')}",)
    return Plan(recipe, base, sources, tuple(entries), tuple(shard_units(entries, shard_size)), None, scales,
                vocabulary, files, notes, parameters=table)


def _check_layers(recipe: Recipe, names: list[str]) -> None:
    """A translated whole-model slice must span every block of the base."""
    layers = recipe.origin.layers if recipe.origin is not None else None
    if layers is not None and layers != block_count(names):
        raise RecipeError(f"slices: layer_range [0, {layers}] but the base has {block_count(names)} blocks; a slice "
                          f"that does not span the whole model re-assembles layers, which primerge does not do yet "
                          f"(issue 29).")


def _one_set_for_prepass(recipe: Recipe, table: ParameterTable) -> None:
    """Refuse parameters that differ between tensors for a method whose whole-model pre-pass is
    built from one set of them (TIES trim_scope: model, PRIME rank: auto, ...)."""
    sets = {json.dumps(d.params.model_dump(mode="json"), sort_keys=True) for d in table.distinct}
    if len(sets) > 1 and recipe.spec.make_prepass(table.distinct[0].params) is not None:
        varying = ", ".join(recipe.settings.varies_over_tensors())
        raise RecipeError(f"method '{recipe.method}' with these parameters runs one whole-model pre-pass with one "
                          f"set of parameters, but {varying} vary over tensors (a gradient or a filter); give them "
                          f"one value, or choose parameters without a pre-pass.")
