"""The method protocol and the registry.

A method is one module that registers a :class:`MethodSpec`: a name, a one-line
description, a pydantic parameter model, and a pure function over one
parameter's task vectors::

    merge(taus, ctx, params) -> update

``taus`` is a float32 tensor of shape ``(T, *shape)`` holding the (weighted) task
vectors τ_t = θ_t − θ₀ of one parameter; ``update`` is the merged, already
scaled task vector, so the engine writes θ₀ + update. A method never opens a
file and never loops over parameter names.

A method registered with ``factored=True`` receives a
:class:`primerge.methods.stack.TaskStack` instead for its matrix parameters: the same task
vectors, LoRA ones kept as factors L R (see that module).

Methods that need a whole-model pass (TIES with a model-wide trim, PRIME's
adaptive rank, EMR rescalers, ...) declare a :class:`Prepass` factory; the
engine streams every mergeable tensor through it before the merge pass and
hands its :meth:`Prepass.result` to ``merge`` as ``ctx.prepass``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from primerge.errors import RecipeError, closest
from primerge.validation import validate
from primerge.linalg import SVDMode
from primerge.methods.stack import TaskStack, as_dense

Kind = Literal["matrix", "fallback"]
Family = Literal["elementwise", "svd"]


class MethodParams(BaseModel):
    """Base of every method's parameter model: unknown names are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SVDParams(MethodParams):
    """Parameters shared by SVD methods: α scales the merged update (θ = θ₀ + α·τ); ``svd``
    overrides the automatic choice between exact and randomized truncated SVD."""

    alpha: float = Field(1.0, description="α scaling the merged update")
    svd: SVDMode = Field("auto", description="SVD algorithm: auto | exact | randomized")


@dataclass(frozen=True)
class TensorContext:
    """What a method knows about the tensor it merges.

    ``kind`` is ``matrix`` for 2-D linear weights that get the SVD treatment and
    ``fallback`` for everything else; ``seed`` is derived from the recipe seed and
    the tensor name (:func:`derive_seed`), so results do not depend on the order
    tensors are visited; ``prepass`` is the declared whole-model pass's result.
    """

    name: str
    kind: Kind
    seed: int = 0
    prepass: Any = None


class Prepass(Protocol):
    """A whole-model pass declared by a method.

    The engine calls ``observe(i, taus, ctx)`` for every mergeable tensor in
    pass ``i`` (for ``i`` in ``range(passes)``), then ``end_pass(i)``; after the last
    pass ``result()`` is handed to the merge function as ``ctx.prepass``.
    """

    passes: int

    def observe(self, pass_index: int, taus: Tensor, ctx: TensorContext) -> None: ...

    def end_pass(self, pass_index: int) -> None: ...

    def result(self) -> Any: ...


MergeFn = Callable[[Tensor, TensorContext, Any], Tensor]


@dataclass(frozen=True)
class PerTaskUpdate:
    """Result of a per-task method (e.g. EMR) for one parameter.

    ``update`` is the unified task vector written into the output model;
    ``task_tensors`` maps a key (e.g. ``mask``) to a tensor with a leading task axis
    (T, *shape) that the engine stores per task. Together with the scalars of the
    method's pre-pass result (``task_scalars()``), :attr:`MethodSpec.rebuild` turns
    them back into task t's own update.
    """

    update: Tensor
    task_tensors: dict[str, Tensor]


RebuildFn = Callable[[Tensor, dict[str, Tensor], dict[str, float]], Tensor]
#: (Σ_t τ_t, T, ctx, params) -> update, for merges that depend on the task vectors only through their sum.
SumMergeFn = Callable[[Tensor, int, TensorContext, Any], Tensor]


def mean_of_sum(total: Tensor, tasks: int, ctx: TensorContext, params: Any) -> Tensor:
    """α · mean_t τ_t from the sum: the SVD family's rule for non-matrix tensors (ALGORITHMS.md)."""
    return params.alpha * (total / tasks)


@dataclass(frozen=True)
class MethodSpec:
    """A registered merging method.

    ``family`` is ``elementwise`` (the function sees every floating tensor) or
    ``svd`` (the function sees matrix parameters only; the rest go to ``fallback``,
    by default ``α · mean_t τ_t``, ALGORITHMS.md Conventions). ``prepass`` builds the
    whole-model pass for the given parameters, or returns ``None`` when these
    parameters need none. ``rebuild(update, task_tensors_t, scalars_t)`` marks a
    per-task method and gives task t's update from what its merge stored.
    ``factored`` marks a method whose matrix merge takes a
    :class:`primerge.methods.stack.TaskStack` (LoRA task vectors as their factors); every
    other merge, fallback and pre-pass receives the dense (T, *shape) tensor.
    """

    name: str
    description: str
    params_model: type[MethodParams]
    merge: MergeFn
    family: Family
    prepass: Callable[[Any], Prepass | None] | None = None
    fallback: MergeFn | None = None
    rebuild: RebuildFn | None = None
    factored: bool = False
    sum_merge: SumMergeFn | None = None

    def sum_merge_for(self, ctx: TensorContext) -> SumMergeFn | None:
        """This tensor's merge as a function of Σ_t τ_t alone, when it is one.

        The engine then accumulates the sum one model at a time instead of stacking T task
        vectors (peak memory independent of T). The SVD family's default fallback α · mean_t τ_t
        = α · (Σ_t τ_t)/T is one; an element-wise method declares ``sum_merge`` (Task
        Arithmetic). Must equal ``apply`` on the stacked task vectors.
        """
        if self.family == "svd" and ctx.kind != "matrix":
            return mean_of_sum if self.fallback is None else None
        return self.sum_merge

    @property
    def per_task(self) -> bool:
        """Whether the method produces one model per task (its merge returns :class:`PerTaskUpdate`)."""
        return self.rebuild is not None

    def parameters(self, values: dict[str, Any] | None = None) -> MethodParams:
        """Validate ``values`` against the parameter model, defaults filled in."""
        return validate(self.params_model, dict(values or {}), f"parameters of method '{self.name}'")

    def make_prepass(self, params: MethodParams) -> Prepass | None:
        """The whole-model pass these parameters need, if any."""
        return self.prepass(params) if self.prepass is not None else None

    def apply(self, taus: Tensor | TaskStack, ctx: TensorContext, params: MethodParams) -> Tensor:
        """Merged update of one tensor, dispatching SVD methods' non-matrices to the fallback.

        ``taus`` is a dense (T, *shape) tensor or a :class:`TaskStack`; a ``factored`` method's
        matrix merge gets the stack, everything else the dense tensor.
        """
        if self.factored and ctx.kind == "matrix":
            return self.merge(TaskStack.of(taus), ctx, params)
        taus = as_dense(taus)
        if self.family == "svd" and ctx.kind != "matrix":
            if self.fallback is not None:
                return self.fallback(taus, ctx, params)
            return mean_of_sum(taus.sum(0), taus.shape[0], ctx, params)
        return self.merge(taus, ctx, params)


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (module import time); names are unique."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """Look a method up by name, suggesting the closest one when unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RecipeError(
            f"unknown method '{name}'.{closest(name, _REGISTRY)} "
            f"Available: {', '.join(sorted(_REGISTRY))} (see `primerge methods`)."
        ) from None


def list_methods() -> list[MethodSpec]:
    """Every registered method, in registration order."""
    return list(_REGISTRY.values())


def derive_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the recipe seed and a tensor name (order independent)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
