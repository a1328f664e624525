"""Layer stacks: an output whose transformer blocks are ranges of its inputs' blocks (passthrough,
depth up-scaling, "frankenmerges"), each range copied from one model or merged from several.

The recipe (:class:`SliceRecipe`)::

    base: models/base              # its config.json (rewritten) and support files become the output's
    models:                        # the inputs the slices name besides the base (may be empty)
      - {path: models/code, name: code}
      - {path: models/math, name: math}
    method: task_arithmetic        # merges the slices that list several sources (default: passthrough)
    parameters: {scale: 0.5}
    slices:                        # the output's blocks, in order; ranges are [first, end)
      - {model: base, layers: [0, 24]}               # base blocks 0..23 -> output blocks 0..23
      - {model: code, layers: [8, 32]}               # code blocks 8..31 -> output blocks 24..47
      - sources:                                     # merged -> output blocks 48..55
          - {model: base, layers: [16, 24]}          #   θ₀: the base's blocks
          - {model: code, layers: [16, 24]}          #   θ_t: each model's
          - {model: math, layers: [16, 24]}
    embeddings: base               # the tensors before the first block (input embeddings), or merged
    head: base                     # the tensors after the last block (final norm, LM head), or merged

A slice of several sources lists the base and every model once, over ranges of one length n: its
block k (0 ≤ k < n) is the method's merge of θ₀ = block first_base + k of the base and θ_t = block
first_t + k of model t, i.e. θ₀ + Δ(τ_1, ..., τ_T) with τ_t = θ_t − θ₀ (the recipe's method and
parameters, as in a plain merge). A slice of one source copies its blocks bit for bit; its
``scale`` (a number, or filtered values in the parameter language, :mod:`primerge.core.parameters`,
a gradient running over the slice's blocks) multiplies them, as mergekit's passthrough ``scale``
does (0 on ``o_proj`` and ``down_proj`` makes the duplicated blocks of a depth up-scaling start as
identities). ``embeddings``/``head``: ``merged`` merges those tensors over the base and every model.

Blocks are the tensors whose name holds a block index (:func:`primerge.core.tensor_names.layer_index`)
under the base's block prefix (``model.layers.``); output block j is renumbered in every name. Every
block taken must hold the tensors (names after the index, shapes) of the base's block 0; the
tensors outside blocks are the base's, input embeddings (class ``embed``) before the blocks, the
rest (final norm, head) after.

The output's config is the base's, rewritten: ``num_hidden_layers``; ``layer_types`` (each block
keeps the attention type it had in its model, as transformers reads it: written in ``layer_types``
or derived from ``sliding_window_pattern``, ``max_window_layers``, ...); every other list of one
entry per block under a name holding ``layer`` (e.g. ``no_rope_layers``), and block-index lists
(``mlp_only_layers``), remapped; ``tie_word_embeddings`` false when the head is not the output's input
embedding (``head`` from another model than ``embeddings`` in a base that ties them: the output then
stores ``lm_head.weight``).

mergekit's ``slices`` translate to this form (:func:`from_mergekit`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from primerge.core.assembly import (BASE, PASSTHROUGH, AssembledPlan, AssembledRecipe, Merged, Origin, TensorRef,
                                    assembled_plan, input_config, open_inputs)
from primerge.core.mergekit import model_reference
from primerge.core.parameters import Place, parse_setting
from primerge.core.tensor_names import TIED, input_embedding, tensor_class
from primerge.io.files import load_json
from primerge.io.hf import transformers_module
from primerge.io.readers import Checkpoint
from primerge.methods.lines_scaling import BLOCK_PATTERN
from primerge.util.errors import InputError, RecipeError, closest

MERGED = "merged"
#: lists of block indices in a config (remapped to the output's indices of the blocks they name)
INDEX_LISTS = ("mlp_only_layers",)
#: the head a tied base does not store, written when the output unties it
HEAD = "lm_head.weight"
_BLOCK = re.compile(BLOCK_PATTERN)


class SliceSource(BaseModel):
    """Blocks ``layers`` = [first, end) of ``model`` (a model's name, or ``base``); ``scale``
    multiplies a single source's tensors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    layers: tuple[int, int]
    scale: Any = None

    @model_validator(mode="after")
    def _range(self) -> SliceSource:
        first, end = self.layers
        if not 0 <= first < end:
            raise ValueError(f"layers [{first}, {end}] of '{self.model}' is not a range [first, end) with "
                             f"0 <= first < end")
        if self.scale is not None:
            parse_setting(self.scale, f"slices: '{self.model}' scale")
        return self

    @property
    def length(self) -> int:
        return self.layers[1] - self.layers[0]


class Slice(BaseModel):
    """Consecutive output blocks from one source (copied) or several (merged); ``{model, layers,
    scale}`` is short for one source."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: list[SliceSource] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _one_source(cls, value: Any) -> Any:
        if isinstance(value, dict) and "sources" not in value:
            return {"sources": [value]}
        return value

    @property
    def merged(self) -> bool:
        return len(self.sources) > 1

    @property
    def length(self) -> int:
        return self.sources[0].length


class SliceRecipe(AssembledRecipe):
    """A recipe with ``slices`` (see the module docstring)."""

    slices: list[Slice] = Field(min_length=1)
    embeddings: str = BASE
    head: str = BASE

    @model_validator(mode="after")
    def _slices_name_inputs(self) -> SliceRecipe:
        labels = [BASE, *self.model_labels()]
        for i, piece in enumerate(self.slices):
            for source in piece.sources:
                if source.model not in labels:
                    raise RecipeError(f"slices[{i}]: model '{source.model}' is not the base or a model's name"
                                      f"{closest(source.model, labels)} (inputs: {', '.join(labels)}).")
            if piece.merged:
                self._check_merged(i, piece, labels)
        for key in ("embeddings", "head"):
            value = getattr(self, key)
            if value not in labels and value != MERGED:
                raise RecipeError(f"{key}: '{value}' is not the base, a model's name or merged (inputs: "
                                  f"{', '.join(labels)}).")
            if value == MERGED and not self.merges:
                raise RecipeError(f"{key}: merged needs a method and models to merge; name a model instead.")
        used = {s.model for piece in self.slices for s in piece.sources} | {self.embeddings, self.head}
        unused = [label for label in labels[1:] if label not in used and MERGED not in used]
        if unused:
            raise RecipeError(f"models {', '.join(unused)} are in no slice; drop them or use them.")
        return self

    def _check_merged(self, i: int, piece: Slice, labels: list[str]) -> None:
        named = [s.model for s in piece.sources]
        if not self.merges:
            raise RecipeError(f"slices[{i}] lists {len(named)} sources, which method passthrough cannot merge; "
                              f"name a method (e.g. method: task_arithmetic), or give one source per slice.")
        if sorted(named) != sorted(labels):
            raise RecipeError(f"slices[{i}] merges {', '.join(named)}; a merged slice lists the base (θ₀) and every "
                              f"model once ({', '.join(labels)}).")
        if len({s.length for s in piece.sources}) > 1:
            raise RecipeError(f"slices[{i}]: its sources' ranges differ in length "
                              f"({', '.join(f'{s.model} {list(s.layers)}' for s in piece.sources)}); a merged slice "
                             f"merges block k of every source.")
        if any(s.scale is not None for s in piece.sources):
            raise RecipeError(f"slices[{i}]: scale applies to a slice of one source; a merged slice takes the "
                              f"method's parameters.")

    def assemble(self, shard_size: int) -> AssembledPlan:
        inputs = open_inputs(self)
        try:
            return slice_plan(self, inputs, shard_size)
        except BaseException:
            for checkpoint in inputs.values():
                checkpoint.close()
            raise


# ------------------------------------------------------------------------------------ blocks


@dataclass(frozen=True)
class Blocks:
    """One checkpoint's tensors by block: ``prefix`` (``model.layers.``), ``blocks[i]`` maps the
    names after the index (``.mlp.up_proj.weight``) to full names, ``outside`` the rest."""

    prefix: str
    blocks: dict[int, dict[str, str]]
    outside: list[str]

    @classmethod
    def of(cls, checkpoint: Checkpoint, prefix: str | None = None) -> Blocks:
        """Split by block index; ``prefix`` the block prefix (default: the one most names share)."""
        found: dict[str, dict[int, dict[str, str]]] = {}
        for name in checkpoint.names:
            match = _BLOCK.search(name)
            if match:
                found.setdefault(name[:match.start(1)], {}).setdefault(int(match.group(1)), {})[name[match.end(1):]] = name
        if prefix is None:
            prefix = max(found, key=lambda p: sum(map(len, found[p].values())), default="")
        blocks = found.get(prefix, {})
        inside = {n for block in blocks.values() for n in block.values()}
        return cls(prefix, blocks, [n for n in checkpoint.names if n not in inside])

    def name(self, block: int, suffix: str) -> str:
        return f"{self.prefix}{block}{suffix}"


@dataclass(frozen=True)
class Placed:
    """Output block ``block`` from block ``source`` of ``model``; ``merged`` its slice's (model, block) pairs."""

    block: int
    model: str
    source: int
    merged: tuple[tuple[str, int], ...] = ()


def _block_map(recipe: SliceRecipe) -> list[tuple[Slice, list[Placed]]]:
    """Every slice with its output blocks; a merged block is placed at its base source's block."""
    out, placed = 0, []
    for piece in recipe.slices:
        blocks = []
        for k in range(piece.length):
            pairs = tuple((s.model, s.layers[0] + k) for s in piece.sources)
            lead = next((p for p in pairs if p[0] == BASE), pairs[0])
            blocks.append(Placed(out, lead[0], lead[1], pairs if piece.merged else ()))
            out += 1
        placed.append((piece, blocks))
    return placed


def _check_blocks(blocks: Mapping[str, Blocks], inputs: Mapping[str, Checkpoint], used: list[Placed]) -> None:
    """Every block taken holds the base block 0's tensors with their shapes."""
    base = inputs[BASE]
    template = blocks[BASE].blocks.get(0)
    if not template:
        raise InputError(f"{base.path}: the base has no transformer blocks (no tensor named like "
                         f"'model.layers.0.…'); slices stack blocks.")
    for place in used:
        for model, index in place.merged or ((place.model, place.source),):
            mine = blocks[model].blocks.get(index)
            if mine is None:
                raise InputError(f"{inputs[model].path}: '{model}' has {len(blocks[model].blocks)} blocks; a slice "
                                 f"takes its block {index}. Fix the slice's layers.")
            if set(mine) != set(template):
                odd = sorted(set(mine) ^ set(template))[0]
                raise InputError(f"{inputs[model].path}: block {index} of '{model}' and block 0 of the base hold "
                                 f"different tensors (e.g. '…{odd}'); slices stack blocks of one architecture.")
            for suffix, name in mine.items():
                info, want = inputs[model].info(name), base.info(template[suffix])
                if info.shape != want.shape:
                    raise InputError(f"{info.file}: tensor '{name}' of '{model}' is {list(info.shape)}, the base's "
                                     f"'{template[suffix]}' is {list(want.shape)}; slices stack blocks of one "
                                     f"architecture (hidden size, heads, MLP width).")


# ------------------------------------------------------------------------------------ origins


def _scale(source: SliceSource, name: str, depth: float) -> float | None:
    """A single source's ``scale`` at output tensor ``name``, ``depth`` its block's place in the slice."""
    if source.scale is None:
        return None
    value = parse_setting(source.scale, f"slices: '{source.model}' scale").at(Place(name, tensor_class(name), None, depth))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"slices: '{source.model}' scale at '{name}' is {value!r:.40}; a scale is a number.")
    return float(value)


def _block_origins(recipe: SliceRecipe, blocks: Mapping[str, Blocks], layout: list[tuple[Slice, list[Placed]]]
                   ) -> dict[str, Origin]:
    """Output block tensors and their origins, in output order."""
    base = blocks[BASE]
    origins: dict[str, Origin] = {}
    for piece, placed in layout:
        for k, place in enumerate(placed):
            depth = k / (piece.length - 1) if piece.length > 1 else 1.0
            for suffix in base.blocks[0]:
                out = base.name(place.block, suffix)
                if place.merged:
                    pairs = dict(place.merged)
                    origins[out] = Merged(TensorRef(BASE, blocks[BASE].name(pairs[BASE], suffix)),
                                          {m: blocks[m].name(i, suffix) for m, i in pairs.items() if m != BASE})
                else:
                    scale = _scale(piece.sources[0], out, depth)
                    origins[out] = TensorRef(place.model, blocks[place.model].name(place.source, suffix), scale)
    return origins


def _own_name(checkpoint: Checkpoint, name: str) -> str:
    """``name`` in ``checkpoint``, or, for a tied head it does not store, its input embedding."""
    if name in checkpoint:
        return name
    embedding = input_embedding(checkpoint.names)
    if TIED.search(name) and embedding is not None:
        return embedding
    raise InputError(f"{checkpoint.path}: has no tensor '{name}', which the base has outside its blocks.")


def _outside_origin(recipe: SliceRecipe, inputs: Mapping[str, Checkpoint], source: str, name: str,
                    read_as: str | None = None) -> Origin:
    """Tensor ``name`` (outside the blocks) of the output from ``source`` (a label or ``merged``),
    read under ``read_as`` (default ``name``; a tied head is read from the embedding)."""
    wanted = read_as or name
    if source != MERGED:
        return TensorRef(source, _own_name(inputs[source], wanted))
    return Merged(TensorRef(BASE, _own_name(inputs[BASE], wanted)),
                  {label: _own_name(inputs[label], wanted) for label in recipe.model_labels()})


def _ties(checkpoint: Checkpoint) -> bool:
    """Whether ``checkpoint`` stores no head of its own (it is tied to its input embedding)."""
    embedding = input_embedding(checkpoint.names)
    return embedding is not None and not any(TIED.search(n) and n != embedding for n in checkpoint.names)


def _outside_origins(recipe: SliceRecipe, inputs: Mapping[str, Checkpoint], base: Blocks
                     ) -> tuple[dict[str, Origin], dict[str, Origin], bool]:
    """(before the blocks, after the blocks, whether the output unties its head). The output keeps
    the base's tying (a tied head is the output's input embedding, as mergekit writes it) unless the
    head comes from a model that stores a head of its own: it is then stored and untied."""
    before = {n: _outside_origin(recipe, inputs, recipe.embeddings, n) for n in base.outside if tensor_class(n) == "embed"}
    after = {n: _outside_origin(recipe, inputs, recipe.head, n) for n in base.outside if n not in before}
    heads = recipe.model_labels() if recipe.head == MERGED else [recipe.head]
    untie = _ties(inputs[BASE]) and not all(_ties(inputs[h]) for h in heads)
    if untie:
        after[HEAD] = _outside_origin(recipe, inputs, recipe.head, HEAD)
    return before, after, untie


# ------------------------------------------------------------------------------------ config


def _config_section(config: dict) -> tuple[tuple[str, ...], dict]:
    """Where ``num_hidden_layers`` lives: the config, or its ``text_config``."""
    if "num_hidden_layers" not in config and isinstance(config.get("text_config"), dict):
        return ("text_config",), config["text_config"]
    return (), config


def _layer_types(folder: Path) -> list | None:
    """The per-block attention types transformers reads for ``folder`` (``layer_types``, derived
    from the config's patterns when not written), or ``None`` when the architecture has none."""
    try:
        config = transformers_module().AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError):  # an architecture transformers does not know: the file says
        section = _config_section(load_json(folder / "config.json", "config.json"))[1]
        return section.get("layer_types")
    types = getattr(config.get_text_config(), "layer_types", None)
    return list(types) if types is not None else None


def _config_changes(recipe: SliceRecipe, inputs: Mapping[str, Checkpoint], placed: list[Placed], untie: bool
                    ) -> tuple[dict[tuple[str, ...], Any], list[str]]:
    """The output config's changes (see the module docstring) and notes."""
    labels = {p.model for p in placed} | {BASE}
    files = {label: input_config(inputs[label], label) for label in labels}
    configs = {label: _config_section(load_json(f, "config.json"))[1] for label, f in files.items()}
    path, base = _config_section(load_json(files[BASE], "config.json"))
    count = base.get("num_hidden_layers")
    changes: dict[tuple[str, ...], Any] = {}
    if len(placed) != count:
        changes[(*path, "num_hidden_layers")] = len(placed)
    types = {label: _layer_types(f.parent) for label, f in files.items()}
    if types[BASE] is not None:
        out = [(types[p.model] or types[BASE])[p.source] for p in placed]
        if out != types[BASE]:
            changes[(*path, "layer_types")] = out
    notes = []
    for key, value in base.items():
        if key in INDEX_LISTS and isinstance(value, list):
            kept = [p.block for p in placed if p.source in configs[p.model].get(key, value)]
            if kept != value:
                changes[(*path, key)] = kept
        elif "layer" in key and key != "layer_types" and isinstance(value, list) and len(value) == count:
            out = [configs[p.model].get(key, value)[p.source] for p in placed]
            if out != value:
                changes[(*path, key)] = out
                notes.append(f"config: {key} (one entry per block) remapped to the output's blocks")
    if untie:
        changes[("tie_word_embeddings",)] = False
    return changes, notes


# ------------------------------------------------------------------------------------ plan


def _ranges(blocks: Sequence[int]) -> str:
    return f"{blocks[0]}" if len(blocks) == 1 else f"{blocks[0]}-{blocks[-1]}"


def _map_rows(recipe: SliceRecipe) -> list[tuple[str, str]]:
    """(output blocks, where they come from) per slice."""
    rows = []
    for piece, placed in _block_map(recipe):
        where = ", ".join(f"{s.model} {_ranges(range(*s.layers))}" for s in piece.sources)
        how = f"merged by {recipe.method}" if piece.merged else (
            "copied" if piece.sources[0].scale is None else f"copied, scale {piece.sources[0].scale}")
        rows.append((_ranges([p.block for p in placed]), f"{where} ({how})"))
    return rows


def _architecture(recipe: SliceRecipe, inputs: Mapping[str, Checkpoint], placed: list[Placed], untie: bool) -> list[str]:
    config = load_json(input_config(inputs[BASE], BASE), "config.json")
    classes = config.get("architectures") or ["model"]
    lines = [f"{classes[0]}, {len(placed)} blocks (the base has {_config_section(config)[1].get('num_hidden_layers')})"]
    lines += [f"blocks {blocks}: {where}" for blocks, where in _map_rows(recipe)]
    lines.append(f"embeddings: {recipe.embeddings}; final norm and head: {recipe.head}; {_tying(inputs, untie)}")
    return lines


def _tying(inputs: Mapping[str, Checkpoint], untie: bool) -> str:
    if untie:
        return "head untied (lm_head.weight stored, tie_word_embeddings: false)"
    return "the head is the input embedding (tied, as in the base)" if _ties(inputs[BASE]) else "head stored"


def _card(recipe: SliceRecipe, inputs: Mapping[str, Checkpoint], untie: bool) -> str:
    rows = "\n".join(f"| {blocks} | {where} |" for blocks, where in _map_rows(recipe))
    tie = f" Head: {_tying(inputs, untie)}."
    return (f"## Layer map\n\nThe output's transformer blocks, in order, and where each comes from (ranges of "
            f"the inputs' blocks, counted from 0).\n\n| output blocks | from |\n|---|---|\n{rows}\n\n"
            f"Embeddings from `{recipe.embeddings}`, final norm and head from `{recipe.head}`.{tie}\n")


def slice_plan(recipe: SliceRecipe, inputs: Mapping[str, Checkpoint], shard_size: int) -> AssembledPlan:
    """The plan of a layer stack (see the module docstring)."""
    base = Blocks.of(inputs[BASE])
    blocks = {label: base if label == BASE else Blocks.of(c, base.prefix) for label, c in inputs.items()}
    layout = _block_map(recipe)
    placed = [p for _, ps in layout for p in ps]
    _check_blocks(blocks, inputs, placed)
    origins = _block_origins(recipe, blocks, layout)
    before, after, untie = _outside_origins(recipe, inputs, base)
    config, notes = _config_changes(recipe, inputs, placed, untie)
    return assembled_plan(recipe, inputs, {**before, **origins, **after}, config=config, notes=notes,
                          architecture=_architecture(recipe, inputs, placed, untie), map_section=_card(recipe, inputs, untie),
                          shard_size=shard_size)


# ------------------------------------------------------------------------------------ mergekit


def _label(reference: str, taken: set[str]) -> str:
    """A name for the model at ``reference``: its last path part, made unique among ``taken``."""
    stem = Path(reference.split("@")[0]).name or "model"
    label, k = stem, 2
    while label in taken:
        label, k = f"{stem}-{k}", k + 1
    taken.add(label)
    return label


def _source(raw: object, where: str, labels: dict[str, str], passthrough: bool) -> dict[str, Any]:
    if not isinstance(raw, dict) or set(raw) - {"model", "layer_range", "parameters"}:
        raise RecipeError(f"{where}: a source is {{model, layer_range, parameters}}, not {raw!r:.80}.")
    layers = raw.get("layer_range")
    if not (isinstance(layers, list) and len(layers) == 2 and all(isinstance(x, int) for x in layers)):
        raise RecipeError(f"{where}: layer_range {layers!r:.40} is not [first, end].")
    source: dict[str, Any] = {"model": labels[raw["model"]], "layers": layers}
    parameters = raw.get("parameters") or {}
    if passthrough and set(parameters) <= {"scale"}:
        source.update({"scale": parameters["scale"]} if "scale" in parameters else {})
    elif parameters:
        raise RecipeError(f"{where}: parameters {', '.join(map(str, parameters))} of one slice's source are not "
                          f"translated; give them under the recipe's parameters (filtered by tensor name) or per "
                          f"model.")
    return source


def from_mergekit(config: Mapping[str, Any]) -> dict[str, Any]:
    """mergekit's ``slices`` (with its ``base_model`` and ``merge_method``) as this module's recipe
    fields: ``base``, ``models`` (each named after its path's last part), ``slices``, ``embeddings``,
    ``head`` (mergekit takes the tensors before the blocks from the first slice's sources and those
    after from the last slice's), and ``method: passthrough`` for mergekit's passthrough. Any other
    method and its ``parameters`` (and ``dtype``, ``tokenizer``, ...) are the caller's to translate.
    A slice's base model other than ``base_model``, its ``parameters`` and ``residual_weight``, and a
    merged source's ``parameters`` are refused with the fix."""
    slices = config.get("slices")
    if not isinstance(slices, list) or not slices:
        raise RecipeError("slices: a non-empty list of {sources: [{model, layer_range}]}.")
    passthrough = config.get("merge_method") == PASSTHROUGH
    pieces = []
    for i, piece in enumerate(slices):
        if not isinstance(piece, dict) or not isinstance(piece.get("sources"), list) or not piece["sources"]:
            raise RecipeError(f"slices[{i}]: a slice is {{sources: [{{model, layer_range}}, ...]}}.")
        extra = [k for k in ("parameters", "residual_weight") if piece.get(k) is not None]
        if piece.get("base_model") not in (None, config.get("base_model")):
            extra.append("base_model")
        if extra or set(piece) - {"sources", "parameters", "residual_weight", "base_model"}:
            raise RecipeError(f"slices[{i}]: {', '.join(extra or sorted(set(piece) - {'sources'}))} of one slice is not "
                              f"translated; give parameters under the recipe's parameters (filtered by tensor "
                              f"name) and one base_model for the whole merge.")
        pieces.append(piece)
    models = [model_reference(s.get("model"), "slices: model")
              for p in pieces for s in p["sources"] if isinstance(s, dict)]
    base = model_reference(config.get("base_model") or models[0], "slices: model")
    taken = {BASE}
    labels = {base: BASE, **{m: _label(m, taken) for m in dict.fromkeys(models) if m != base}}
    native = [{"sources": [_source(s, f"slices[{i}].sources[{j}]", labels, passthrough)
                           for j, s in enumerate(p["sources"])]} for i, p in enumerate(pieces)]
    if any(len(p["sources"]) > 1 for p in native) and not config.get("base_model"):
        raise RecipeError("slices: a slice of several sources is merged against base_model, which the "
                          "configuration does not give; add base_model.")

    def outer(piece: dict) -> str:
        return piece["sources"][0]["model"] if len(piece["sources"]) == 1 else MERGED

    recipe = {"base": base, "models": [{"path": m, "name": label} for m, label in labels.items() if m != base],
              "slices": native, "embeddings": outer(native[0]), "head": outer(native[-1])}
    if passthrough:
        recipe["method"] = PASSTHROUGH
    return recipe
