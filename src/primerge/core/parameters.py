"""The parameter language: a method parameter's value per tensor and per model, fixed when the plan is built.

A recipe gives a parameter a *setting* at the recipe level (``parameters:``) or for one model
(``models: [{path: ..., parameters: {density: 0.3, weight: 0.7}}]``). A setting is

- a **scalar**: ``density: 0.5``;
- a **gradient**, a list of n anchors spread evenly over the depth t ∈ [0, 1] of the network:
  ``density: [0.2, 0.8]``. With s = t (n − 1) and i = ⌊s⌋, a number is interpolated linearly,
  v(t) = (1 − (s − i)) a_i + (s − i) a_min(i+1, n−1), and text or booleans pick a_i (mergekit's rule,
  the same float arithmetic);
- **filtered**: ``[{filter: self_attn, value: 0.3}, {filter: mlp, value: [0.2, 0.8]}, {value: 0.5}]``;
  the first rule whose filter matches the tensor gives its value (a scalar or a gradient). A filter
  matches a tensor whose name contains it (mergekit's rule) or whose class it names in the
  conventions table (:data:`primerge.core.tensor_names.TENSOR_CLASSES`: ``embed``, ``lm_head``,
  ``norm``, ``self_attn``, ``mlp``); no filter, or ``*``, matches every tensor. When no rule
  matches, the next level of precedence decides.

**Depth.** The tensors of transformer block ℓ of L (:func:`primerge.core.tensor_names.layer_index`)
sit at t = ℓ / (L − 1) (t = 1 when L = 1); tensors outside every block (embeddings, final norm,
head) at t = 0, as mergekit 0.1.5 plans them.

**Precedence.** A model's own setting, then the recipe's, then the method's default (for
``weight``, the model's ``weight:`` field, else 1). A parameter the method defines per task
(typed :data:`~primerge.methods.base.PerTask`: TIES's density, DARE's drop rate, ...) resolves
model by model; every other parameter is one value for the merge and is refused per model.
``weight`` is the model's weight w_t, which multiplies its task vector (or has the role the
method gives it).

:func:`resolve_table` gives every mergeable tensor plain values: a validated
:class:`~primerge.methods.base.MethodParams` (a per-task parameter as one number, or a list of one
per model where the models' values differ) and the models' weights; the engine and the methods
never see a setting.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from primerge.core.tensor_names import TENSOR_CLASSES, layer_index, tensor_class
from primerge.methods.base import MethodParams, MethodSpec
from primerge.util.errors import RecipeError, closest
from primerge.util.schema import accepted_names

Scalar = bool | int | float | str
#: the name of a model's weight in the parameter language
WEIGHT = "weight"


# ----------------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class Place:
    """Where a tensor sits: its name, class (conventions table), block ℓ (``None`` outside blocks)
    and depth t ∈ [0, 1]."""

    name: str
    cls: str
    layer: int | None
    depth: float


def block_count(names: Iterable[str]) -> int:
    """L: 1 + the largest block index among ``names`` (0 without blocks)."""
    return 1 + max((i for n in names if (i := layer_index(n)) is not None), default=-1)


def place_of(name: str, blocks: int) -> Place:
    """The :class:`Place` of ``name`` in a network of ``blocks`` blocks (depth rule of the module docstring)."""
    layer = layer_index(name)
    depth = 0.0 if layer is None else (layer / (blocks - 1) if blocks > 1 else 1.0)
    return Place(name, tensor_class(name), layer, depth)


# ----------------------------------------------------------------------------------- settings


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Gradient:
    """Anchors spread evenly over depth (see the module docstring for the interpolation)."""

    anchors: tuple[Scalar, ...]

    def at(self, depth: float) -> Scalar:
        scaled = depth * (len(self.anchors) - 1)
        low = int(scaled)
        if not all(_is_number(a) for a in self.anchors):
            return self.anchors[low]
        high = min(len(self.anchors) - 1, low + 1)
        frac = scaled - low
        return (1 - frac) * self.anchors[low] + frac * self.anchors[high]


@dataclass(frozen=True)
class Rule:
    """One ``{filter, value}`` of a setting; ``filter`` ``None`` matches every tensor."""

    filter: str | None
    value: Scalar | Gradient

    def matches(self, place: Place) -> bool:
        return self.filter in (None, "*") or self.filter in place.name or self.filter == place.cls

    def at(self, place: Place) -> Scalar:
        return self.value.at(place.depth) if isinstance(self.value, Gradient) else self.value


@dataclass(frozen=True)
class Setting:
    """A parsed setting: its rules, and ``raw``, the form it was written in."""

    rules: tuple[Rule, ...]
    raw: Any

    def at(self, place: Place) -> Scalar | None:
        """The value at ``place``, or ``None`` when no rule matches it."""
        rule = next((r for r in self.rules if r.matches(place)), None)
        return None if rule is None else rule.at(place)

    @property
    def varies(self) -> bool:
        """Whether tensors may get different values (a gradient or a filter)."""
        return len(self.rules) > 1 or self.rules[0].filter not in (None, "*") or isinstance(self.rules[0].value, Gradient)

    def anchors(self) -> list[Scalar]:
        """Every value written in the setting (a gradient's values lie between its anchors)."""
        return [a for r in self.rules for a in (r.value.anchors if isinstance(r.value, Gradient) else (r.value,))]


def _value(raw: Any, what: str) -> Scalar | Gradient:
    if isinstance(raw, (bool, int, float, str)):
        return raw
    if isinstance(raw, list) and raw and all(isinstance(a, (bool, int, float, str)) for a in raw):
        return Gradient(tuple(raw))
    raise RecipeError(f"{what} = {raw!r:.80}: a value is a number, text, or a non-empty list of them "
                      f"(a gradient over depth).")


def _rule(raw: Any, what: str) -> Rule:
    if not isinstance(raw, dict) or "value" not in raw or set(raw) - {"filter", "value"}:
        raise RecipeError(f"{what}: each rule of a filtered setting is {{filter: NAME, value: V}} (filter "
                          f"optional), not {raw!r:.80}.")
    name = raw.get("filter")
    if name is not None and (not isinstance(name, str) or not name):
        raise RecipeError(f"{what}: a filter is a tensor class or part of a tensor name, not {name!r:.40}.")
    return Rule(name, _value(raw["value"], what))


def parse_setting(raw: Any, what: str) -> Setting:
    """A setting from its YAML form (see the module docstring); ``what`` names it in errors."""
    if isinstance(raw, dict):
        return Setting((_rule(raw, what),), raw)
    if isinstance(raw, list) and raw and all(isinstance(r, dict) for r in raw):
        return Setting(tuple(_rule(r, what) for r in raw), raw)
    return Setting((Rule(None, _value(raw, what)),), raw)


# ----------------------------------------------------------------------------------- fields


def _members(annotation: Any) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _origin(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return typing.get_origin(annotation) or annotation


def per_task_fields(model: type[MethodParams]) -> set[str]:
    """The fields a method defines per task: typed one value or a list of them (``PerTask``)."""
    found = set()
    for name, info in model.model_fields.items():
        origins = [_origin(m) for m in _members(info.annotation)]
        if list in origins and any(o is not list and o is not type(None) for o in origins):
            found.add(name)
    return found


def verbatim_fields(model: type[MethodParams]) -> set[str]:
    """The fields holding a mapping (an inner method's parameters): taken as written, never a setting."""
    return {n for n, info in model.model_fields.items() if dict in [_origin(m) for m in _members(info.annotation)]}


def _default(model: type[MethodParams], name: str) -> Any:
    return model.model_fields[name].get_default(call_default_factory=True)


# ----------------------------------------------------------------------------------- a recipe's settings


@dataclass(frozen=True)
class ModelSettings:
    """One model's label and its settings by field name (``weight`` included)."""

    label: str
    settings: dict[str, Setting]


@dataclass(frozen=True)
class ParameterSettings:
    """Every setting of a recipe, keyed by the method's field names: ``shared`` (the recipe's
    ``parameters``), each model's own, and ``verbatim`` mappings passed through as written."""

    spec: MethodSpec
    shared: dict[str, Setting]
    models: tuple[ModelSettings, ...]
    verbatim: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, spec: MethodSpec, parameters: dict[str, Any], models: Sequence[tuple[str, dict[str, Any]]]
              ) -> ParameterSettings:
        """Parse the recipe's ``parameters`` and each model's (label, parameters); unknown names get
        the closest one, a shared parameter given per model is refused."""
        fields = accepted_names(spec.params_model)
        verbatim_names = verbatim_fields(spec.params_model)
        shared, verbatim = {}, {}
        for key, raw in parameters.items():
            name = _field(key, fields, spec, "parameters")
            if raw is None:  # unset (``scale: null``, as earlier primerge versions wrote it): the default
                continue
            if name in verbatim_names:
                verbatim[name] = raw
            else:
                shared[name] = parse_setting(raw, f"parameters.{key}")
        per_task = per_task_fields(spec.params_model)
        parsed = tuple(ModelSettings(label, cls._model(spec, label, given, fields, per_task)) for label, given in models)
        return cls(spec, shared, parsed, verbatim)

    @staticmethod
    def _model(spec: MethodSpec, label: str, given: dict[str, Any], fields: dict[str, str], per_task: set[str]
               ) -> dict[str, Setting]:
        settings = {}
        for key, raw in given.items():
            what = f"models '{label}': parameters.{key}"
            name = WEIGHT if key == WEIGHT else _field(key, fields, spec, f"models '{label}': parameters")
            if name != WEIGHT and name not in per_task:
                raise RecipeError(f"{what}: method '{spec.name}' takes one '{name}' for the whole merge; give it "
                                  f"under the recipe's parameters (per model: {', '.join(sorted(per_task | {WEIGHT}))}).")
            settings[name] = parse_setting(raw, what)
        return settings

    def uniform(self) -> dict[str, Any]:
        """The parameters every tensor shares (settings that do not vary), as the method takes them."""
        return {**_scalars(self.shared), **self.verbatim}

    def varying(self) -> list[str]:
        """The parameters (and ``weight``) whose value may differ between tensors or between models."""
        names = {n for n, s in self.shared.items() if s.varies or n == WEIGHT}
        names |= {n for m in self.models for n in m.settings}
        return sorted(names)

    def varies_over_tensors(self) -> list[str]:
        """The parameters (and ``weight``) with a gradient or a filter somewhere."""
        settings = [*self.shared.items(), *((n, s) for m in self.models for n, s in m.settings.items())]
        return sorted({n for n, s in settings if s.varies})

    def resolve(self, place: Place) -> tuple[dict[str, Any], tuple[float, ...]]:
        """The method's parameter values at ``place`` (what the recipe sets there: per-task ones as one
        value, or one per model where they differ) and the models' weights."""
        values = self.uniform()
        names = {n for n in self.shared if n != WEIGHT} | {n for m in self.models for n in m.settings if n != WEIGHT}
        for name in sorted(names):
            value = self._value(name, place)
            if value is not None:
                values[name] = value
        weights = tuple(float(self._model_value(m, WEIGHT, place, 1.0)) for m in self.models)
        return values, weights

    def _value(self, name: str, place: Place) -> Any:
        shared = self.shared[name].at(place) if name in self.shared else None
        if not any(name in m.settings for m in self.models):
            return shared
        fallback = shared if shared is not None else _default(self.spec.params_model, name)
        per_model = [self._model_value(m, name, place, fallback) for m in self.models]
        return per_model[0] if all(v == per_model[0] for v in per_model) else per_model

    def _model_value(self, model: ModelSettings, name: str, place: Place, fallback: Any) -> Any:
        own = model.settings[name].at(place) if name in model.settings else None
        if own is not None:
            return own
        shared = self.shared[name].at(place) if name in self.shared else None
        return fallback if shared is None else shared

    def check(self) -> None:
        """Validate every value written in the settings against the method's parameters, before
        anything is read (a gradient's values lie between its anchors, so its anchors suffice)."""
        shared = self.uniform()
        settings = [("parameters", shared, self.shared),
                    *((f"models '{m.label}': parameters", {**shared, **_scalars(m.settings)}, m.settings) for m in self.models)]
        for where, context, named in settings:
            for name, setting in named.items():
                for anchor in setting.anchors():
                    if name == WEIGHT:
                        if not _is_number(anchor):
                            raise RecipeError(f"{where}.weight = {anchor!r:.40}: a model's weight is a number.")
                        continue
                    try:
                        self.spec.parameters({**context, name: anchor})
                    except RecipeError as exc:
                        raise RecipeError(f"{where}.{name} = {setting.raw!r:.80}: {exc}") from None


def _scalars(settings: dict[str, Setting]) -> dict[str, Any]:
    """The method parameters among ``settings`` that are one value everywhere."""
    return {n: s.rules[0].value for n, s in settings.items() if n != WEIGHT and not s.varies}


def _field(key: str, fields: dict[str, str], spec: MethodSpec, where: str) -> str:
    if key == WEIGHT:
        return WEIGHT
    if not isinstance(key, str) or key not in fields:
        raise RecipeError(f"{where}: method '{spec.name}' has no parameter '{key}'.{closest(str(key), fields)} "
                          f"Parameters: {', '.join(spec.params_model.model_fields) or 'none'}, and weight.")
    return fields[key]


# ----------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class TensorParameters:
    """What one tensor is merged with: the method's validated parameters and the models' weights."""

    params: MethodParams
    weights: tuple[float, ...]


@dataclass(frozen=True)
class ParameterTable:
    """The resolved parameters of every mergeable tensor: ``distinct`` value sets, and the index of
    each tensor's set in ``index`` (most recipes have one set)."""

    distinct: tuple[TensorParameters, ...]
    index: dict[str, int]
    varying: tuple[str, ...] = ()

    def of(self, name: str) -> TensorParameters:
        return self.distinct[self.index[name]]

    def rows(self, names: Sequence[str]) -> list[str]:
        """The resolved values of the parameters that vary, one line per value set and block range
        with the tensor classes that share it, in depth order (names in the order of ``names``)."""
        if not self.varying:
            return []
        if len(self.distinct) == 1:
            return [f"{'every tensor':<40} {self._values(0)}"]
        blocks = block_count(names)
        layers: dict[tuple[str, int], list[int | None]] = {}
        for name in names:
            if name in self.index:
                place = place_of(name, blocks)
                layers.setdefault((place.cls, self.index[name]), []).append(place.layer)
        classes: dict[tuple[str, int], list[str]] = {}
        first: dict[tuple[str, int], int] = {}
        for (cls, i), found in layers.items():
            key = (_layers(found), i)
            classes.setdefault(key, []).append(cls)
            first[key] = min((x for x in found if x is not None), default=-1)
        order = sorted(classes, key=lambda k: (first[k], k[0], k[1]))
        return [f"{', '.join(classes[k]):<22} {k[0]:<25} {self._values(k[1])}" for k in order]

    def _values(self, i: int) -> str:
        chosen = self.distinct[i]
        dumped = chosen.params.model_dump(mode="json")
        parts = [f"{n}={_short(dumped[n])}" for n in self.varying if n in dumped]
        if WEIGHT in self.varying:
            parts.append(f"weight={_short(list(chosen.weights))}")
        return "  ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def _layers(layers: list[int | None]) -> str:
    """``outside blocks``, ``block 3`` or ``blocks 0-2, 5`` (and both, where a set spans them)."""
    inside = sorted({x for x in layers if x is not None})
    spans: list[str] = []
    for x in inside:
        if spans and x == int(spans[-1].split("-")[-1]) + 1:
            spans[-1] = f"{spans[-1].split('-')[0]}-{x}"
        else:
            spans.append(str(x))
    text = ("block " if len(inside) == 1 else "blocks ") + ", ".join(spans) if inside else ""
    outside = "outside blocks" if None in layers else ""
    return " + ".join(t for t in (outside, text) if t)


def weights_at(settings: ParameterSettings, name: str | None, all_names: Sequence[str]) -> tuple[float, ...]:
    """The models' weights at tensor ``name`` (every model's default, 1, unless its settings say
    otherwise; at depth 0 with no name): the weight of a model's token rows in the vocabulary alignment."""
    place = place_of(name, block_count(all_names)) if name is not None else Place("", "other", None, 0.0)
    return settings.resolve(place)[1]


def filter_notes(settings: ParameterSettings, names: Sequence[str]) -> list[str]:
    """A note per filter that matches no tensor of ``names``, or matches tensors by class whose
    names do not contain it (where mergekit, which matches names only, would not)."""
    notes = []
    rules = [r for s in (*settings.shared.values(), *(v for m in settings.models for v in m.settings.values()))
             for r in s.rules if r.filter not in (None, "*")]
    for flt in dict.fromkeys(r.filter for r in rules):
        by_name = [n for n in names if flt in n]
        by_class = [n for n in names if flt not in n and tensor_class(n) == flt]
        if not by_name and not by_class:
            notes.append(f"filter '{flt}' matches no merged tensor (a class: {', '.join(c for c, _ in TENSOR_CLASSES)}, "
                         f"or part of a name)")
        elif by_class:
            notes.append(f"filter '{flt}' matches {len(by_class)} tensors by class whose names do not contain it "
                         f"(e.g. '{by_class[0]}'); mergekit matches names only")
    return notes


def resolve_table(settings: ParameterSettings, names: Sequence[str], all_names: Sequence[str]) -> ParameterTable:
    """Resolve ``settings`` for every tensor of ``names`` (the mergeable ones), depth counted over
    ``all_names`` (the base's); each distinct value set is validated once, and an invalid one is
    refused naming the tensor."""
    blocks = block_count(all_names)
    distinct: list[TensorParameters] = []
    seen: dict[str, int] = {}
    index: dict[str, int] = {}
    for name in names:
        values, weights = settings.resolve(place_of(name, blocks))
        key = json.dumps([values, weights], sort_keys=True, default=str)
        if key not in seen:
            try:
                params = settings.spec.parameters(values)
            except RecipeError as exc:
                raise RecipeError(f"tensor '{name}': the recipe's settings resolve to {values} there: {exc}") from None
            seen[key] = len(distinct)
            distinct.append(TensorParameters(params, weights))
        index[name] = seen[key]
    return ParameterTable(tuple(distinct), index, tuple(settings.varying()))
