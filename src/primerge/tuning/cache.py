"""Merged models for tuning trials, reusing one merge across every value of the linear scale.

Every method here writes θ = θ₀ + λ·U, where λ is its linear scale (``scale``, alias ``alpha``,
:mod:`primerge.tuning.spaces`) and U depends only on the other parameters. So for each setting
of the other parameters the tuner merges once, through the public :func:`primerge.merge_recipe`
at λ = 1, keeps the merged tensors M₁ = θ₀ + U, and derives every trial's model as

    θ(λ) = θ₀ + λ·(M₁ − θ₀)          (in float64, cast to the storage dtype)

For Task Arithmetic M₁ − θ₀ is Σ_t τ_t: the cached sum. A scale given as a gradient over depth
(``primerge tune --search scale-gradient:K``) is derived the same way, tensor by tensor: every
method here merges each tensor with its own resolved parameters, so a tensor at depth t gets
θ₀ + λ(t)·(M₁ − θ₀), λ(t) interpolated by the parameter language's rule
(:class:`~primerge.core.parameters.Gradient`, depth over the base's blocks). The models' weights
(``--search weights``) are part of the merge, like every parameter other than λ. The derivation
agrees with a real merge at λ to the storage dtype's rounding; the tuner checks that once per
method (one extra merge at λ = 1/2, or at a gradient rising from 1/4 to 3/4 when λ is one;
relative error of the update ≤ 1e-4) and falls back to a merge per trial for a method that fails
the check. The best recipe is always merged for real before it is reported.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from primerge.api import merge_recipe
from primerge.core.parameters import Gradient, block_count, place_of
from primerge.io.readers import open_checkpoint
from primerge.output.base import MergeResult
from primerge.core.recipe import Recipe
from primerge.tuning.genome import weighted_models
from primerge.tuning.settings import DEFAULT_CACHE_BYTES
from primerge.tuning.spaces import nested

LINEARITY_CHECK = 0.5
LINEARITY_TOL = 1e-4


@dataclass
class MergedModel:
    """What a trial scores: one merged body (or one per task, e.g. EMR) and each model's
    task-specific tensors (its head)."""

    state: dict[str, Tensor] | None
    task_states: dict[str, dict[str, Tensor]] | None
    task_tensors: dict[str, dict[str, Tensor]]

    @classmethod
    def of(cls, result: MergeResult) -> MergedModel:
        states = result.task_states if result.per_task else None
        return cls(result.state_dict, states, result.task_tensors or {})

    def state_for(self, label: str) -> dict[str, Tensor]:
        """The weights task ``label`` is scored with."""
        return self.task_states[label] if self.task_states is not None else self.state


@dataclass
class Built:
    """A trial's model and how it was obtained."""

    model: MergedModel
    merged: bool  # a merge ran (False: derived from a cached update)
    seconds: float


def recipe_with(recipe: Recipe, parameters: dict[str, Any], purify: dict | None,
                weights: Mapping[str, float] | None = None) -> Recipe:
    """``recipe`` with these method parameters (a point's ``inner_params.x`` nested), purify block
    and, when given, the models' weights by label (the model output, in memory)."""
    models = {} if weights is None else {"models": weighted_models(recipe, weights)}
    return recipe.replace(parameters=nested(parameters), purify=purify, output=None, **models)


Scale = float | list[float]  # one λ, or the anchors of a gradient over depth


def scale_at(lam: Scale, names: list[str]) -> dict[str, float]:
    """λ of every tensor of ``names`` (a network's tensors): one value, or the gradient interpolated
    at each tensor's depth as the parameter language resolves it (depth counted over ``names``)."""
    if not isinstance(lam, list):
        return dict.fromkeys(names, float(lam))
    gradient, blocks = Gradient(tuple(lam)), block_count(names)
    return {name: float(gradient.at(place_of(name, blocks).depth)) for name in names}


def scaled_state(base: dict[str, Tensor], merged: dict[str, Tensor], lam: Scale) -> dict[str, Tensor]:
    """θ₀ + λ·(M₁ − θ₀) per floating tensor, computed in float64, λ per tensor (:func:`scale_at`
    over the base's names); other tensors as merged."""
    lams = scale_at(lam, list(base))
    out = {}
    for name, m in merged.items():
        if not m.dtype.is_floating_point:
            out[name] = m
            continue
        b = base[name].double()
        out[name] = (b + lams[name] * (m.double() - b)).to(m.dtype)
    return out


def check_scale(lam: Scale) -> Scale:
    """Where the linearity check merges for real: λ = 1/2, or for a gradient of K anchors one rising
    evenly from 1/4 to 3/4 (so that the check also covers the interpolation over depth)."""
    if not isinstance(lam, list):
        return LINEARITY_CHECK
    return [0.25 + 0.5 * k / (len(lam) - 1) for k in range(len(lam))] if len(lam) > 1 else [LINEARITY_CHECK]


def update_error(base: dict[str, Tensor], derived: dict[str, Tensor], real: dict[str, Tensor]) -> float:
    """‖(derived − θ₀) − (real − θ₀)‖ / ‖real − θ₀‖ over every floating tensor."""
    num = den = 0.0
    for name, r in real.items():
        if r.dtype.is_floating_point:
            num += float((derived[name].double() - r.double()).square().sum())
            den += float((r.double() - base[name].double()).square().sum())
    return (num / den) ** 0.5 if den > 0 else num ** 0.5


class UpdateCache:
    """Trial models of one method on one recipe (see the module docstring).

    ``scale`` names the linear parameter (None: every trial is a merge). Entries are kept in
    least-recently-used order within ``max_bytes``.
    """

    def __init__(self, recipe: Recipe, scale: str | None, max_bytes: int = DEFAULT_CACHE_BYTES, log=print):
        self.recipe = recipe
        self.scale = scale
        self.max_bytes = max_bytes
        self.log = log
        self.linear: bool | None = None if scale is not None else False
        self._entries: OrderedDict[str, MergedModel] = OrderedDict()
        self._base: dict[str, Tensor] | None = None
        self.merges = 0

    def merge(self, parameters: dict[str, Any], purify: dict | None,
              weights: Mapping[str, float] | None = None) -> MergedModel:
        """A real in-memory merge through the public API."""
        self.merges += 1
        return MergedModel.of(merge_recipe(recipe_with(self.recipe, parameters, purify, weights)))

    def build(self, parameters: dict[str, Any], purify: dict | None = None,
              weights: Mapping[str, float] | None = None) -> Built:
        """The model of one trial (the models' weights by label, or ``None``: the recipe's):
        derived from a cached update when the method is linear."""
        start = time.perf_counter()
        if self.scale is None or self.linear is False or self.scale not in parameters:
            return Built(self.merge(parameters, purify, weights), True, time.perf_counter() - start)
        lam = parameters[self.scale]
        lam = [float(a) for a in lam] if isinstance(lam, list) else float(lam)
        key = json.dumps({"p": {k: v for k, v in parameters.items() if k != self.scale}, "purify": purify,
                          "weights": weights}, sort_keys=True, default=str)
        entry = self._entries.get(key)
        merged = entry is None
        if merged:
            entry = self.merge({**parameters, self.scale: 1.0}, purify, weights)
            if entry.task_states is not None or not self._check_linear({**parameters, self.scale: lam}, purify,
                                                                       entry, weights):
                return Built(self.merge(parameters, purify, weights), True, time.perf_counter() - start)
            self._store(key, entry)
        self._entries.move_to_end(key)
        state = scaled_state(self.base_state(), entry.state, lam)
        model = MergedModel(state, None, entry.task_tensors)
        return Built(model, merged, time.perf_counter() - start)

    def base_state(self) -> dict[str, Tensor]:
        """θ₀ of every merged tensor (read once from the recipe's base)."""
        if self._base is None:
            checkpoint = open_checkpoint(self.recipe.base, allow_pickle=self.recipe.allow_pickle)
            try:
                self._base = {n: checkpoint.load(n) for n in checkpoint.names}
            finally:
                checkpoint.close()
        return self._base

    def _check_linear(self, parameters: dict[str, Any], purify: dict | None, at_one: MergedModel,
                      weights: Mapping[str, float] | None) -> bool:
        """Once per method: a real merge at :func:`check_scale` against the derived one."""
        if self.linear is not None:
            return self.linear
        lam = check_scale(parameters[self.scale])
        real = self.merge({**parameters, self.scale: lam}, purify, weights)
        base = self.base_state()
        error = update_error(base, scaled_state(base, at_one.state, lam), real.state)
        self.linear = error <= LINEARITY_TOL
        if not self.linear:
            self.log(f"  {self.recipe.method}: '{self.scale}' is not a linear scale of the update "
                     f"(relative error {error:.1e}); every trial merges anew")
        return self.linear

    def _store(self, key: str, entry: MergedModel) -> None:
        size = sum(t.numel() * t.element_size() for t in entry.state.values())
        budget = max(1, self.max_bytes // max(size, 1))
        while len(self._entries) >= budget:
            self._entries.popitem(last=False)
        self._entries[key] = entry
