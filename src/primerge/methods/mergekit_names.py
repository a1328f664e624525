"""mergekit's task-arithmetic family under its own names and parameters, mapped onto primerge's methods.

mergekit (0.1.5) runs eight methods through one pipeline: sparsify each τ_t (``density`` per
model, default 1 = keep all), optionally rescale it to its L1 norm (``rescale``), weight it,
optionally elect signs (TIES's sum election), sum, optionally divide by the (agreeing) models'
weights (``normalize``), times ``lambda``. Each name is a primerge method with mergekit's variant
parameters (see those modules):

=====================  ===================================================  ======================
mergekit name          primerge method and variant                          normalize / rescale
=====================  ===================================================  ======================
``task_arithmetic``    ``task_arithmetic``                                  false / —
``ties``               ``ties``, ``rounding: floor``                        true / false
``dare_ties``          ``dare``, ``combine: ties``, drop rate 1 − density   false / true
``dare_linear``        ``dare``, ``combine: linear``                        false / true
``breadcrumbs``        ``breadcrumbs``, ``scope: tensor, rounding: floor``  false / false
``breadcrumbs_ties``   the same with ``combine: ties``                      false / false
``della``              ``della``                                            true / true
``della_linear``       ``della``, ``combine: linear``                       false / true
=====================  ===================================================  ======================

with ``normalize`` → ``weights`` | ``none`` and ``rescale`` → ``l1`` | ``none``. The four names
primerge does not use itself are registered here as methods taking mergekit's parameters
(``density``, ``gamma``, ``epsilon`` one value or one per model; ``normalize``, ``rescale``,
``lambda``); the other four keep the papers' definitions under their names, and
:func:`translate` gives their mergekit meaning as primerge parameters (for reading mergekit
recipes). DARE's and DELLA's drops are random: they match mergekit in distribution, not bit for bit.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import AliasChoices, Field, model_validator

from primerge.methods.base import (MethodParams, PerTask, PerTaskFraction, TensorContext, get_method, merge_method,
                                   task_pairs)
from primerge.methods.stack import TaskStack
from primerge.util.errors import RecipeError
from primerge.util.schema import validate


def _pairwise(first: PerTask, second: PerTask, rule: Callable[[float, float], float]) -> PerTask:
    """``rule`` of two per-task values: one value, or a per-model list when either is a list."""
    pairs = [rule(a, b) for a, b in task_pairs(first, second)]
    return pairs if isinstance(first, list) or isinstance(second, list) else pairs[0]


class GeneralizedTaskArithmetic(MethodParams):
    """mergekit's shared parameters; subclasses set the defaults and the primerge method they map to."""

    target: ClassVar[str]
    normalize: bool = Field(False, description="divide by the (agreeing) models' weights")
    rescale: bool = Field(False, description="rescale each sparsified τ_t to the L1 norm of τ_t")
    scale: float = Field(1.0, validation_alias=AliasChoices("lambda", "scale", "alpha"),
                         description="λ multiplying the merged update (mergekit's lambda; alias: scale, alpha)")

    @abstractmethod
    def variant(self) -> dict[str, Any]:
        """The primerge parameters of :attr:`target` that give this mergekit method."""

    def target_parameters(self) -> MethodParams:
        """The validated parameters of :attr:`target`."""
        return get_method(self.target).parameters(self.variant())

    @model_validator(mode="after")
    def _maps_onto_target(self) -> GeneralizedTaskArithmetic:
        try:
            self.target_parameters()
        except RecipeError as exc:
            raise ValueError(str(exc)) from None
        return self

    def _normalize(self) -> str:
        return "weights" if self.normalize else "none"

    def _rescale(self) -> str:
        return "l1" if self.rescale else "none"


class Sparsified(GeneralizedTaskArithmetic):
    density: PerTaskFraction = Field(1.0, description="fraction of each τ_t kept (one, or one per model)")


class TaskArithmetic(GeneralizedTaskArithmetic):
    target = "task_arithmetic"

    def variant(self) -> dict[str, Any]:
        return {"normalize": self._normalize(), "scale": self.scale}


class Ties(Sparsified):
    target = "ties"
    normalize: bool = Field(True, description="divide by the agreeing models' weights")

    def variant(self) -> dict[str, Any]:
        return {"density": self.density, "rounding": "floor", "normalize": self._normalize(),
                "rescale": self._rescale(), "scale": self.scale}


class DareTies(Sparsified):
    target = "dare"
    combine: ClassVar[str] = "ties"
    rescale: bool = Field(True, description="rescale each dropped τ_t to the L1 norm of τ_t")

    def variant(self) -> dict[str, Any]:
        return {"drop_rate": _pairwise(self.density, 0.0, lambda d, _: 1.0 - d), "combine": self.combine,
                "rescale": self._rescale(), "normalize": self._normalize(), "scale": self.scale}


class DareLinear(DareTies):
    combine: ClassVar[str] = "linear"


class Breadcrumbs(Sparsified):
    target = "breadcrumbs"
    combine: ClassVar[str] = "linear"
    gamma: PerTaskFraction = Field(0.01, description="fraction of the largest |values| dropped (one, or one per "
                                   "model)")

    def variant(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "density": self.density, "scope": "tensor", "rounding": "floor",
                "combine": self.combine, "normalize": self._normalize(), "rescale": self._rescale(),
                "scale": self.scale}


class BreadcrumbsTies(Breadcrumbs):
    combine: ClassVar[str] = "ties"


class Della(Sparsified):
    target = "della"
    combine: ClassVar[str] = "ties"
    normalize: bool = Field(True, description="divide by the agreeing models' weights")
    rescale: bool = Field(True, description="rescale each pruned τ_t to the L1 norm of τ_t")
    epsilon: PerTask = Field(0.15, description="ε: keep probabilities span density ± ε (one, or one per model)")

    def variant(self) -> dict[str, Any]:
        # mergekit keeps a τ_t whole at density >= 1 whatever ε: there every p_i = 1, so ε = 0.
        epsilon = _pairwise(self.density, self.epsilon, lambda d, e: 0.0 if d >= 1.0 else e)
        return {"density": self.density, "epsilon": epsilon, "combine": self.combine, "rescale": self._rescale(),
                "normalize": self._normalize(), "scale": self.scale}


class DellaLinear(Della):
    combine: ClassVar[str] = "linear"
    normalize: bool = Field(False, description="divide by the models' weights")


#: mergekit's name -> its parameters and their mapping onto primerge.
MERGEKIT_METHODS: dict[str, type[GeneralizedTaskArithmetic]] = {
    "task_arithmetic": TaskArithmetic, "ties": Ties, "dare_ties": DareTies, "dare_linear": DareLinear,
    "breadcrumbs": Breadcrumbs, "breadcrumbs_ties": BreadcrumbsTies, "della": Della, "della_linear": DellaLinear,
}


def translate(name: str, parameters: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The primerge method and parameters that compute mergekit's ``name`` with ``parameters``
    (its method-level ones plus per-model ``density``/``gamma``/``epsilon`` lists)."""
    model = validate(MERGEKIT_METHODS[name], parameters, f"parameters of mergekit method '{name}'")
    return model.target, model.variant()


def _register(name: str, description: str) -> None:
    params_model = MERGEKIT_METHODS[name]
    target = get_method(params_model.target)

    def merge(taus: TaskStack, ctx: TensorContext, params: GeneralizedTaskArithmetic):
        return target.apply(taus, ctx, params.target_parameters())

    merge.__doc__ = f"mergekit's {name}: {params_model.target} with mergekit's variant parameters."
    merge_method(name, params_model, description, family=target.family, reads_base=target.reads_base,
                 weights=target.weights, models=target.models)(merge)


_register("dare_ties", "mergekit's DARE-TIES: dare with combine: ties, drop rate 1 - density, rescale: l1 "
          "(rescale: true), normalize: none (normalize: false)")
_register("dare_linear", "mergekit's linear DARE: dare with combine: linear, drop rate 1 - density, rescale: l1 "
          "(rescale: true), normalize: none")
_register("della_linear", "mergekit's linear DELLA: della with combine: linear, epsilon 0.15, rescale: l1 "
          "(rescale: true), normalize: none")
_register("breadcrumbs_ties", "mergekit's Breadcrumbs-TIES: breadcrumbs with combine: ties, scope: tensor, "
          "rounding: floor, normalize: none")
