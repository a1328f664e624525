"""Search spaces: which parameters ``primerge tune`` searches for each method, and over what.

A method's space has two kinds of dimensions:

- **the linear scale** (``scale``, alias ``alpha``): every method here multiplies its merged update
  by it (θ = θ₀ + λ·update), so a trial that changes only λ needs no new merge — the tuner
  derives θ₀ + λ·U from one cached update U per setting of the other parameters
  (:mod:`primerge.tuning.cache`). Searched log-uniformly over a factor range around a reference:
  the parameter's default, or 1/T where an unset scale means 1/T (the uniform weighting of
  Task Arithmetic, PRIME Table 2).
- **structural parameters** (rank, density, β, ...): searched over a few values each, so that
  the cache of merged updates is reused across trials.

Where the space comes from, first match wins:

1. :data:`SPACES`, this module's registry keyed by method name (every built-in method);
2. for a merge inside an aligned space (KnOTS, Core Space: ``inner`` and ``inner_params``), its
   inner merge's space with every name under ``inner_params.`` (``inner_params.density``): what
   tuning the inner merge means there, as the KnOTS paper tunes its inner TIES;
3. hints on the method's own parameter fields, so a new method declares its space next to its
   parameters without touching this package or ``methods/base.py``::

       density: float = Field(0.2, json_schema_extra={"tune": [0.1, 0.2, 0.3]})

   (a list is a set of choices; ``{"low": a, "high": b, "log": true}`` a float range);
4. the generic rule: the linear scale only — ``scale`` (or a field named ``alpha``) — over
   factors [1/4, 4] of its reference.

A method without any of these (EMR) has nothing to tune: its study is its default setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from primerge.util.errors import RecipeError
from primerge.methods.base import MethodSpec, get_method
from primerge.methods.knots import AlignedParams

LINEAR_NAMES = ("scale", "alpha")
#: Where an aligned method's point names its inner merge's parameters.
INNER_PREFIX = "inner_params."
#: Factor range of a scale whose reference is a sum-like merge (λ = 1/T, Iso α = 1): wide.
SUM_FACTORS = (0.25, 4.0)
#: Factor range of a scale whose merge is already normalised (disjoint mean, whitened SVD): narrow.
MEAN_FACTORS = (0.5, 2.0)


@dataclass(frozen=True)
class Choice:
    """A categorical dimension: one of ``values``."""

    values: tuple

    def suggest(self, trial, name: str):
        return trial.suggest_categorical(name, list(self.values))

    def describe(self) -> str:
        return "{" + ", ".join(_short(v) for v in self.values) + "}"


@dataclass(frozen=True)
class Range:
    """A float dimension on [low, high], log-uniform when ``log``."""

    low: float
    high: float
    log: bool = True

    def suggest(self, trial, name: str):
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def describe(self) -> str:
        return f"[{_short(self.low)}, {_short(self.high)}]" + (" log" if self.log else "")


Dimension = Choice | Range


@dataclass(frozen=True)
class Scale:
    """The linear scale ``name``: λ = factor × reference, factor log-uniform in ``factors``;
    ``reference`` None means 1/T."""

    name: str
    reference: float | None = None
    factors: tuple[float, float] = SUM_FACTORS

    def dimension(self, tasks: int) -> Range:
        ref = self.reference if self.reference is not None else 1.0 / tasks
        return Range(ref * self.factors[0], ref * self.factors[1], log=True)


@dataclass(frozen=True)
class MethodSpace:
    """The tuned parameters of one method: its linear scale (if any) and structural dimensions."""

    scale: Scale | None = None
    params: dict[str, Dimension] = field(default_factory=dict)
    source: str = "registry"

    def dimensions(self, tasks: int, include: dict[str, Any] | None = None) -> dict[str, Dimension]:
        """Every dimension, the linear scale last (its range resolved for ``tasks`` models),
        widened so that each value in ``include`` (the first trial's) is a point of it."""
        dims = dict(self.params)
        if self.scale is not None:
            dims[self.scale.name] = self.scale.dimension(tasks)
        for name, value in (include or {}).items():
            if name in dims:
                dims[name] = including(dims[name], value)
        return dims

    @property
    def empty(self) -> bool:
        return self.scale is None and not self.params


def _beta_grid() -> Choice:
    return Choice((0.0, 0.005, 0.01, 0.02, 0.05))


#: The registry: the searched parameters of every built-in method (docs/lab.md, "Tuning").
SPACES: dict[str, MethodSpace] = {
    "task_arithmetic": MethodSpace(Scale("scale")),
    "ties": MethodSpace(Scale("scale", 1.0, MEAN_FACTORS), {"density": Choice((0.05, 0.1, 0.2, 0.3, 0.5))}),
    "tsv": MethodSpace(Scale("scale", 1.0, MEAN_FACTORS)),
    "prime": MethodSpace(Scale("scale", 1.0, MEAN_FACTORS), {
        "rank": Choice((0.005, 0.01, 0.02, 0.04, 0.08)),
        "residual": Choice(("mean", "ties", "s_sb")),
    }),
    # λ's default depends on combine (1/T or 1): one range [0.05, 2] covers both
    "dare": MethodSpace(Scale("scale", 0.25, (0.2, 8.0)), {
        "drop_rate": Choice((0.5, 0.7, 0.8, 0.9)),
        "combine": Choice(("linear", "ties")),
    }),
    "della": MethodSpace(Scale("scale", 1.0, MEAN_FACTORS), {
        "density": Choice((0.1, 0.2, 0.3, 0.5)),
        "epsilon": Choice((0.05, 0.1, 0.2)),
    }),
    "breadcrumbs": MethodSpace(Scale("scale"), {
        "gamma": Choice((0.005, 0.01, 0.02, 0.05)),
        "density": Choice((0.7, 0.8, 0.9)),
    }),
    "consensus": MethodSpace(Scale("scale"), {"k": Choice((1, 2, 3)), "lam": Choice((0.2, 0.4, 0.6))}),
    "iso_c": MethodSpace(Scale("scale", 1.0)),
    "iso_cts": MethodSpace(Scale("scale", 1.0), {"common_ratio": Choice((0.6, 0.7, 0.8, 0.9))}),
    "subspace_boosting": MethodSpace(Scale("scale", 1.0), {
        "beta": _beta_grid(),
        "base_merge": Choice(("task_arithmetic", "ties")),
    }),
    "drm": MethodSpace(Scale("scale", 1.0, MEAN_FACTORS), {
        "density": Choice((0.1, 0.2, 0.3, 0.5)),
        "variant": Choice(("H", "V")),
    }),
    "ho_subspace_boosting": MethodSpace(Scale("scale"), {"beta": _beta_grid()}),
    "emr": MethodSpace(),
}


def _hint(extra: Any) -> Dimension | None:
    """A field's ``json_schema_extra={"tune": ...}`` hint as a dimension (None when absent)."""
    hint = extra.get("tune") if isinstance(extra, dict) else None
    if hint is None:
        return None
    if isinstance(hint, (list, tuple)) and hint:
        return Choice(tuple(hint))
    if isinstance(hint, dict) and {"low", "high"} <= set(hint):
        return Range(float(hint["low"]), float(hint["high"]), bool(hint.get("log", True)))
    raise RecipeError(f"tuning hint {hint!r}: use a list of choices or {{low, high, log}}.")


def generic_scale(spec: MethodSpec) -> Scale | None:
    """The generic rule: ``scale`` (else a field named ``alpha``); reference = its default
    (None: 1/T), factors [1/4, 4]."""
    fields = spec.params_model.model_fields
    for name in LINEAR_NAMES:
        if name in fields:
            default = fields[name].get_default(call_default_factory=True)
            if default is None or (isinstance(default, (int, float)) and default > 0):
                return Scale(name, None if default is None else float(default))
    return None


def space_for(spec: MethodSpec, fixed: dict[str, Any] | None = None) -> MethodSpace:
    """The registry's space for ``spec``, else its inner merge's (an aligned method, whose
    ``inner`` may be fixed), else its fields' hints plus the generic scale."""
    if spec.name in SPACES:
        return SPACES[spec.name]
    if issubclass(spec.params_model, AlignedParams):
        return aligned_space(spec.parameters(fixed or {}).inner)
    scale = generic_scale(spec)
    params = {}
    for name, info in spec.params_model.model_fields.items():
        dim = _hint(info.json_schema_extra)
        if dim is not None and (scale is None or name != scale.name):
            params[name] = dim
    return MethodSpace(scale, params, source="field hints" if params else "generic rule")


def aligned_space(inner: str) -> MethodSpace:
    """The inner merge's space with its names under :data:`INNER_PREFIX`."""
    space = space_for(get_method(inner))
    scale = replace(space.scale, name=INNER_PREFIX + space.scale.name) if space.scale else None
    return MethodSpace(scale, {INNER_PREFIX + k: v for k, v in space.params.items()}, source=f"inner merge {inner}")


def nested(parameters: dict[str, Any]) -> dict[str, Any]:
    """A point's parameters as a recipe takes them: ``inner_params.x`` entries moved into the
    ``inner_params`` mapping (over any fixed ones)."""
    out = {k: v for k, v in parameters.items() if not k.startswith(INNER_PREFIX)}
    inner = {k[len(INNER_PREFIX):]: v for k, v in parameters.items() if k.startswith(INNER_PREFIX)}
    if inner:
        out["inner_params"] = {**out.get("inner_params", {}), **inner}
    return out


def defaults_in_space(spec: MethodSpec, space: MethodSpace, tasks: int,
                      fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The method's parameters (``fixed`` over its defaults) as a point of the space: the first
    trial. An unset scale is 1/T (its meaning in every method with one, except DARE-TIES)."""
    model = spec.parameters(fixed or {})
    params = model.model_dump()
    if isinstance(model, AlignedParams):
        params.update({INNER_PREFIX + k: v for k, v in model.inner_parameters().model_dump().items()})
    point: dict[str, Any] = {}
    for name, dim in space.dimensions(tasks).items():
        value = params.get(name)
        point[name] = 1.0 / tasks if value is None and isinstance(dim, Range) else value
    return point


def including(dim: Dimension, value: Any) -> Dimension:
    """``dim`` with ``value`` added (a choice) or inside (a range widened to it)."""
    if isinstance(dim, Choice):
        return dim if value in dim.values else Choice((*dim.values, value))
    value = float(value)
    if dim.low <= value <= dim.high or (dim.log and value <= 0):
        return dim
    return Range(min(dim.low, value), max(dim.high, value), dim.log)


def describe_dimensions(dims: dict[str, Dimension]) -> str:
    """One line: ``name in choices/range`` for every dimension, or ``nothing to tune``."""
    return "; ".join(f"{name} in {dim.describe()}" for name, dim in dims.items()) or "nothing to tune"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if value and abs(math.log10(abs(value))) < 4 else f"{value:g}"
    return str(value)
