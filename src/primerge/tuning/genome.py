"""The genome of ``primerge tune --search``: what a study searches beside each method's own parameters.

``--search PART ...`` names the parts (default ``params``):

- ``params``: each method's own parameters, its linear scale included (:mod:`primerge.tuning.spaces`);
- ``weights`` (or ``weights:LOW:HIGH``): one weight w_t per model, uniform on [0, 1] (or the range
  given; a negative weight subtracts a task vector). It is the model's ``weight:`` in the recipe:
  τ_t ← w_t τ_t before the method (or the role the method gives weights,
  :mod:`primerge.methods.base`). With the scale searched too, the weights set the mix and λ its
  overall size. A weight the recipe gives as a gradient or filtered setting is replaced by one number;
- ``scale-gradient:K``: the method's linear scale as a gradient of K ≥ 2 anchors a_0 … a_{K−1}
  over depth, in place of one λ: block ℓ of L sits at t = ℓ/(L − 1), s = t(K − 1), i = ⌊s⌋ and
  λ(t) = (1 − (s − i)) a_i + (s − i) a_{min(i+1, K−1)} (mergekit's interpolation, the parameter
  language's :class:`~primerge.core.parameters.Gradient`); tensors outside the blocks take a_0.
  Each anchor ranges over the scalar scale's range; the recipe says ``parameters: {scale: [a_0, …]}``.
  With K ≤ L every anchor moves some block; with more, an anchor may fall between two blocks and
  change nothing (the study notes which).

Together these are the genome of mergekit-evolve (a weight per model and a few anchors of a
per-layer gradient) with primerge's validation suites as the objective. The first trial is the
recipe as given: each model's own weight (1 unless set), and the recipe's scale (or the method's
default) resampled at the K anchors' depths t_k = k/(K − 1), so a flat gradient when it was one number.

A method without a linear scale (EMR), or whose scale is an inner merge's (KnOTS, Core Space: the
inner parameters are passed as written, never as gradients) searches no gradient; its study says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from primerge.core.parameters import WEIGHT, Gradient, block_count, place_of
from primerge.core.recipe import Recipe
from primerge.io.readers import open_checkpoint
from primerge.methods.base import MethodSpec
from primerge.tuning.spaces import (INNER_PREFIX, Dimension, MethodSpace, Range, defaults_in_space,
                                    describe_dimensions, including)
from primerge.util.errors import RecipeError

PARAMS, WEIGHTS, GRADIENT = "params", "weights", "scale-gradient"
#: More anchors than this is a gradient finer than any search budget can place.
MAX_ANCHORS = 32


def weight_name(label: str) -> str:
    """The study's name of model ``label``'s weight."""
    return f"{WEIGHT}[{label}]"


def anchor_name(scale: str, k: int) -> str:
    """The study's name of anchor ``k`` of the scale's gradient."""
    return f"{scale}[{k}]"


@dataclass(frozen=True)
class WeightSpace:
    """Each model's weight, uniform on [low, high]."""

    low: float = 0.0
    high: float = 1.0

    def dimension(self) -> Range:
        return Range(self.low, self.high, log=False)

    def describe(self) -> str:
        return f"{WEIGHTS}:{self.low:g}:{self.high:g}"


@dataclass(frozen=True)
class ScaleGradient:
    """The linear scale as ``anchors`` values spread evenly over depth."""

    anchors: int

    def resampled(self, value: float | list[float]) -> list[float]:
        """``value`` (a number or a gradient) at the anchors' depths t_k = k/(K − 1)."""
        gradient = Gradient(tuple(value) if isinstance(value, list) else (value,))
        return [float(gradient.at(k / (self.anchors - 1))) for k in range(self.anchors)]

    def idle(self, names: Sequence[str]) -> list[int]:
        """The anchors that no tensor of ``names`` (a network's) takes any part of: with more anchors
        than blocks, some fall between two blocks' depths (K = 3 over 2 blocks: anchor 1)."""
        blocks = block_count(names)
        depths = {place_of(name, blocks).depth for name in names}
        unit = [tuple(float(k == j) for j in range(self.anchors)) for k in range(self.anchors)]
        return [k for k in range(self.anchors) if all(Gradient(unit[k]).at(d) < 1e-9 for d in depths)]

    def describe(self) -> str:
        return f"{GRADIENT}:{self.anchors}"


@dataclass(frozen=True)
class Genome:
    """The parts searched beside the method's own parameters (module docstring)."""

    weights: WeightSpace | None = None
    gradient: ScaleGradient | None = None


def search_parts(method_params: bool, genome: Genome | None) -> list[str]:
    """The ``--search`` parts that give this search (:func:`parse_search`'s inverse)."""
    found = [PARAMS] if method_params else []
    for part in (genome.weights, genome.gradient) if genome else ():
        found += [part.describe()] if part is not None else []
    return found


def parse_search(parts: Sequence[str]) -> tuple[bool, Genome]:
    """(whether the methods' own parameters are searched, the genome) from ``--search`` parts."""
    weights = gradient = None
    for part in parts:
        name, _, rest = part.partition(":")
        if name == WEIGHTS:
            weights = _weight_space(rest, part)
        elif name == GRADIENT:
            gradient = ScaleGradient(_anchors(rest, part))
        elif name != PARAMS or rest:
            raise RecipeError(f"--search {part}: choose among {PARAMS}, {WEIGHTS} (or {WEIGHTS}:LOW:HIGH) and "
                              f"{GRADIENT}:K (K anchors over depth).")
    if not parts:
        raise RecipeError(f"--search needs at least one part: {PARAMS}, {WEIGHTS} or {GRADIENT}:K.")
    return PARAMS in parts, Genome(weights, gradient)


def _weight_space(rest: str, part: str) -> WeightSpace:
    if not rest:
        return WeightSpace()
    try:
        low, high = (float(x) for x in rest.split(":"))
    except ValueError:
        raise RecipeError(f"--search {part}: write the range as {WEIGHTS}:LOW:HIGH, e.g. {WEIGHTS}:0:1.") from None
    if not low < high or max(abs(low), abs(high)) == float("inf"):
        raise RecipeError(f"--search {part}: the weights' range needs finite LOW < HIGH, e.g. {WEIGHTS}:-1:1.")
    return WeightSpace(low, high)


def _anchors(rest: str, part: str) -> int:
    if not rest.isdigit() or not 2 <= int(rest) <= MAX_ANCHORS:
        raise RecipeError(f"--search {part}: give the number of anchors, 2 to {MAX_ANCHORS}, "
                          f"e.g. {GRADIENT}:3 (one value at the first block, the middle and the last).")
    return int(rest)


@dataclass(frozen=True)
class MethodSearch:
    """What one method's study searches: its dimensions, the first trial, and how a point of the study
    becomes the recipe's values (the gradient's anchors as one list, the models' weights)."""

    dims: dict[str, Dimension]
    first: dict[str, Any]
    source: str
    scale: str | None = None  # the scale searched as a gradient
    anchors: int = 0
    labels: tuple[str, ...] = ()  # the models whose weights are searched
    notes: tuple[str, ...] = field(default_factory=tuple)

    def parameters(self, point: Mapping[str, Any]) -> dict[str, Any]:
        """The method's parameters of ``point``: its own, and the scale's gradient as a list."""
        taken = {weight_name(label) for label in self.labels}
        anchors = [anchor_name(self.scale, k) for k in range(self.anchors)] if self.scale else []
        params = {k: v for k, v in point.items() if k not in taken and k not in anchors}
        if anchors:
            params[self.scale] = [point[a] for a in anchors]
        return params

    def weights(self, point: Mapping[str, Any]) -> dict[str, float] | None:
        """The models' weights of ``point`` by label, or ``None`` when they are not searched."""
        return {label: point[weight_name(label)] for label in self.labels} if self.labels else None

    def describe(self, dims: Mapping[str, Dimension]) -> str:
        """``dims`` (this search's with any others of the study) in words, with the notes."""
        return f"{describe_dimensions(dims)} ({self.source})" + "".join(f"; {note}" for note in self.notes)


def method_search(spec: MethodSpec, space: MethodSpace, recipe: Recipe, fixed: dict[str, Any], labels: Sequence[str],
                  method_params: bool, genome: Genome | None) -> MethodSearch:
    """The study's space for ``spec``: its own space (when ``method_params``) with the genome's parts.
    ``fixed`` are the parameters every tensor shares in the recipe (the first trial's starting point)."""
    tasks, genome = len(labels), genome or Genome()
    first = defaults_in_space(spec, space, tasks, fixed) if method_params else {}
    dims = space.dimensions(tasks, first) if method_params else {}
    notes: list[str] = []
    scale, anchors = None, 0
    if genome.gradient is not None:
        if space.scale is None or space.scale.name.startswith(INNER_PREFIX):
            notes.append(f"no {GRADIENT}: {spec.name} has no linear scale of its own")
        else:
            scale, anchors = space.scale.name, genome.gradient.anchors
            names = base_names(recipe)
            idle = genome.gradient.idle(names)
            if idle:
                notes.append(f"anchor(s) {', '.join(map(str, idle))} of {genome.gradient.describe()} fall between "
                             f"the base's {block_count(names)} blocks and change nothing")
            start = genome.gradient.resampled(_scale_start(spec, space, recipe, fixed, tasks))
            dims.pop(scale, None)
            first.pop(scale, None)
            for k, value in enumerate(start):
                dims[anchor_name(scale, k)] = including(space.scale.dimension(tasks), value)
                first[anchor_name(scale, k)] = value
    if genome.weights is not None:
        own = _own_weights(recipe)
        for label, weight in zip(labels, own):
            dims[weight_name(label)] = including(genome.weights.dimension(), weight)
            first[weight_name(label)] = weight
    source = f"{space.source}, method parameters {'searched' if method_params else 'as given'}"
    return MethodSearch(dims, first, source, scale, anchors, tuple(labels) if genome.weights else (), tuple(notes))


def base_names(recipe: Recipe) -> list[str]:
    """The tensor names of the recipe's base (no tensor is read)."""
    checkpoint = open_checkpoint(recipe.base, allow_pickle=recipe.allow_pickle)
    try:
        return list(checkpoint.names)
    finally:
        checkpoint.close()


def _scale_start(spec: MethodSpec, space: MethodSpace, recipe: Recipe, fixed: dict[str, Any],
                 tasks: int) -> float | list[float]:
    """The recipe's scale when it names this method and gives the scale as one number or one gradient
    for every tensor, else the method's default (1/T where unset)."""
    setting = recipe.settings.shared.get(space.scale.name) if recipe.method == spec.name else None
    if setting is not None and len(setting.rules) == 1 and setting.rules[0].filter in (None, "*"):
        value = setting.rules[0].value
        return list(value.anchors) if isinstance(value, Gradient) else float(value)
    return defaults_in_space(spec, MethodSpace(space.scale), tasks, fixed)[space.scale.name]


def _own_weights(recipe: Recipe) -> list[float]:
    """Each model's weight as the recipe gives it: one number, else 1."""
    found = []
    for model in recipe.settings.models:
        setting = model.settings.get(WEIGHT)
        found.append(float(setting.rules[0].value) if setting is not None and not setting.varies else 1.0)
    return found


def weighted_models(recipe: Recipe, weights: Mapping[str, float]) -> list[dict[str, Any]]:
    """The recipe's ``models`` entries with these weights (by label), each as the entry's ``weight:``
    (a weight among its ``parameters`` dropped: one weight per model)."""
    entries = []
    for label, entry in zip(recipe.model_labels(), recipe.models):
        data = entry.model_dump(exclude_unset=True, exclude_none=True)
        own = {k: v for k, v in entry.parameters.items() if k != WEIGHT}
        data.pop("parameters", None)
        entries.append({**data, "weight": float(weights[label]), **({"parameters": own} if own else {})})
    return entries


def grouped(params: Mapping[str, Any]) -> dict[str, Any]:
    """A study's point as the recipe reads it: ``scale[k]`` anchors as one list ``scale``, and
    ``weight[label]`` entries as one mapping ``weights`` (label -> weight); other names as they are."""
    out: dict[str, Any] = {}
    weights: dict[str, Any] = {}
    anchors: dict[str, dict[int, Any]] = {}
    for key, value in params.items():
        name, bracket, index = key.partition("[")
        if not bracket or not index.endswith("]"):
            out[key] = value
        elif name == WEIGHT:
            weights[index[:-1]] = value
        else:
            anchors.setdefault(name, {})[int(index[:-1])] = value
    out.update({name: [found[k] for k in sorted(found)] for name, found in anchors.items()})
    if weights:
        out[WEIGHTS] = weights
    return out
