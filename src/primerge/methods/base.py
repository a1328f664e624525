"""The method protocol and the registry.

A method is one module: a pydantic parameter model and a pure function over one parameter's
task vectors, registered with :func:`merge_method`::

    @merge_method("tsv", TSVParams, "TSV-M: ⌊r/T⌋ singular directions per task, whitened and summed")
    def merge(taus: TaskStack, ctx: TensorContext, params: TSVParams) -> Tensor:
        ...

``taus`` is always a :class:`~primerge.methods.stack.TaskStack`: the (weighted) task vectors
τ_t = θ_t − θ₀ of one tensor, dense or as LoRA factors; ``.dense()`` gives the (T, *shape) float32
tensor, ``.sum()``, ``.truncated_svd(r)`` and ``.sum_svd()`` work on factors directly. The
result is the merged, already scaled update, so the output is θ₀ + update. A method never opens
a file and never loops over parameter names.

What a registration declares, once:

- ``family``: ``svd`` methods merge matrix parameters with their function and give every other
  floating tensor ``other`` (by default α·mean_t τ_t, docs/algorithms.md, "Conventions");
  ``elementwise`` methods merge every floating tensor with their function.
- :func:`reads_sum` on a function: its result depends on the task vectors only through Σ_t τ_t.
  The stream then accumulates the sum one model at a time and hands over
  :meth:`TaskStack.of_sum <primerge.methods.stack.TaskStack.of_sum>` (memory independent of T).
- ``prepass``: a factory of the whole-model pass these parameters need (TIES model-wide trim,
  PRIME's adaptive rank, EMR's rescalers), or ``None``. Its result reaches the merge as
  ``ctx.prepass``. Pre-passes are reducible (:class:`Prepass`), so units can run anywhere.
- ``rebuild`` (+ ``card``): a per-task method (EMR) returns :class:`PerTaskUpdate`;
  ``rebuild(update, task tensors of t, scalars of t)`` gives task t's own update and ``card`` is
  the formula the model card states.
- ``svd_requests``: the truncated SVDs the matrix function asks for, as (batch shape, rank) pairs
  of a function of (matrix shape, T, parameters, pre-pass result); the merge reports ``svd:
  auto``'s choice for each distinct one at its start (:func:`primerge.engine.stream.svd_choices`, with
  no pre-pass result), and after the pre-pass those that only it could tell (PRIME ``rank: auto``).
- ``shape_note``: a sentence for a matrix shape on which the parameters do not mean what they
  say (PRIME's rank capped); the merge reports each distinct one at its start
  (:func:`primerge.engine.stream.shape_notes`).
- ``reads_base``: the function reads θ₀ itself (methods defined on the weights θ_t = θ₀ + τ_t, not
  only on τ_t: SLERP, Karcher, Arcee Fusion); the stream hands it over as ``ctx.base``.
- ``weights``: ``applied`` (default) — the stack holds w_t τ_t, each model's weight already applied;
  ``given`` — the stack holds τ_t and the method gives the weights ``taus.weights`` a role of its
  own (interpolation factors of NuSLERP, barycentric weights of Multi-SLERP and Karcher).
  Either way ``taus.weights`` are the models' weights w_t, so a method can normalise by them.
- ``reads_grams``: the function reads the Gram matrices G_t = X_tᵀX_t / rows of a linear layer's
  inputs X_t on each task's data (RegMean), handed over as ``ctx.grams`` (T, n, n) float64 for a
  2-D weight whose layer the data reached (``None`` otherwise). ``own``: X_t is task t's data
  through model t; ``merged``: through the merged model's earlier layers (RegMean++). The recipe
  then names each task's data (its ``calibration:`` block) and the API runs the data pass
  (:mod:`primerge.calibration`); the method itself still never opens a file.
- ``models``: how many models (besides the base) the method merges, (least, most or ``None``):
  SLERP and NearSwap take one, NuSLERP two, Model Stock at least two. A recipe listing another
  number is refused before anything is read (:meth:`MethodSpec.check_models`).

A parameter the math defines per task (TIES's density, DARE's drop rate) is typed
:data:`PerTask`: one value for every task, or one per task in model order;
:func:`per_task` gives it as a (T,) tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from pydantic import AliasChoices, BaseModel, ConfigDict, Field
import torch
from torch import Tensor

from primerge.util.errors import RecipeError, closest, quoted
from primerge.linalg import OutputPrecision, SVDMode
from primerge.methods.stack import TaskStack
from primerge.util.schema import validate

#: Which of its functions a method applies to a tensor: the two treatments of the plan
#: (:data:`primerge.core.sources.Treatment`) a method sees; experts and reshaped tensors reach it as
#: matrices, copies not at all.
Kind = Literal["matrix", "fallback"]
#: (matrix shape, T, parameters) -> the (batch shape, rank) of every truncated SVD the merge asks for.
SVDRequests = Callable[[tuple[int, int], int, Any, Any], list[tuple[tuple[int, ...], int]]]
ShapeNote = Callable[[tuple[int, int], int, Any], str | None]
Family = Literal["elementwise", "svd"]
WeightsRole = Literal["applied", "given"]
#: Whose activations a data-aware method's Gram matrices are taken from (``reads_grams``).
GramInputs = Literal["own", "merged"]
#: A fraction in [0, 1] (densities, drop rates).
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
#: A parameter defined per task: one value for all tasks, or one per task in model order.
PerTask = float | list[float]
PerTaskFraction = Fraction | list[Fraction]
#: What a combined sum is divided by: the number of contributing tasks, the sum of their models'
#: weights (mergekit's ``normalize: true``), or nothing.
Normalize = Literal["count", "weights", "none"]


class MethodParams(BaseModel):
    """Base of every method's parameter model: unknown names are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def scale_field(default: float | None, description: str) -> Any:
    """The multiplier of a method's merged update: ``scale``, with ``alpha`` accepted as its alias
    (the TSV/PRIME/Iso papers call it α, the TA/TIES papers λ; it is one concept)."""
    return Field(default, description=description, validation_alias=AliasChoices("scale", "alpha"))


def task_values(value: PerTask, tasks: int, name: str) -> list[float]:
    """A :data:`PerTask` parameter as one Python float per task (exact, for counts); a list whose
    length is not the number of models is a :class:`RecipeError` naming the parameter."""
    values = list(value) if isinstance(value, list) else [value] * tasks
    if len(values) != tasks:
        raise RecipeError(f"parameter '{name}' has {len(values)} values but the recipe merges {tasks} models; "
                          "give one value, or one per model in the order of 'models'.")
    return values


def task_pairs(first: PerTask, second: PerTask) -> list[tuple[float, float]]:
    """The per-task pairs of two :data:`PerTask` values (a single value paired with every entry of a
    list; two lists paired position by position), for checks that tie two parameters together."""
    count = max(len(v) if isinstance(v, list) else 1 for v in (first, second))
    firsts = first if isinstance(first, list) else [first] * count
    seconds = second if isinstance(second, list) else [second] * count
    return list(zip(firsts, seconds))


def per_task(value: PerTask, taus: TaskStack, name: str) -> Tensor:
    """A :data:`PerTask` parameter as a (T,) tensor in the stack's dtype and device (:func:`task_values`)."""
    return torch.tensor(task_values(value, taus.T, name), dtype=taus.dtype, device=taus.device)


def along_tasks(values: Tensor, like: Tensor) -> Tensor:
    """(T,) ``values`` shaped (T, 1, ..., 1) to broadcast against ``like`` (T, *shape)."""
    return values.reshape(values.shape[0], *(1,) * (like.dim() - 1))


def uniform_scale(scale: float | None, tasks: int) -> float:
    """λ, where unset means 1/T: the PRIME paper's uniform weighting of summed task vectors (Table 2)."""
    return 1.0 / tasks if scale is None else scale


class SVDParams(MethodParams):
    """Parameters shared by SVD methods: ``scale`` α multiplies the merged update (θ = θ₀ + α·τ);
    ``svd`` overrides the automatic choice between exact and randomized truncated SVD."""

    scale: float = scale_field(1.0, "α scaling the merged update (alias: alpha)")
    svd: SVDMode = Field("auto", description="SVD algorithm: auto | exact | randomized")


@dataclass(frozen=True)
class TensorContext:
    """What a method knows about the tensor it merges.

    ``kind`` is ``matrix`` for 2-D linear weights that get the SVD treatment and ``fallback``
    for everything else; ``seed`` is derived from the recipe seed and the tensor name
    (:func:`primerge.util.seeding.derive_seed`), so results do not depend on the order tensors are
    visited; ``prepass`` is the declared whole-model pass's result; ``base`` is θ₀ of the tensor
    (the dtype and device of the task vectors) for a method registered with ``reads_base``;
    ``grams`` the (T, n, n) float64 Gram matrices of the tensor's inputs for a method registered
    with ``reads_grams``, when the data reached its layer; ``precision`` how finely the merged
    tensor is written (output dtype, θ₀'s scale), for ``svd: auto``'s acceptance of a block Krylov
    SVD (:mod:`primerge.linalg.certificate`; ``None``: the strict residual check).
    """

    name: str
    kind: Kind
    seed: int = 0
    prepass: Any = None
    base: Tensor | None = None
    grams: Tensor | None = None
    precision: OutputPrecision | None = None


class Prepass(Protocol):
    """A whole-model pass declared by a method, made of reducible per-tensor statistics.

    In pass ``i`` (``i`` in ``range(passes)``) the stream calls ``observe(i, taus, ctx)`` for every
    mergeable tensor — a pure function of the tensor and of what earlier passes decided, so it can
    run on any worker — and folds the statistics in plan order with ``combine`` (associative), then
    calls ``end_pass(i, total)`` (``total`` is ``None`` for a model without mergeable tensors).
    After the last pass, ``result()`` reaches the merge as ``ctx.prepass``. Statistics whose
    reduction is a floating-point sum are kept as ordered lists and summed in ``end_pass``, so the
    result does not depend on how the tensors were split into units.
    """

    passes: int

    def observe(self, pass_index: int, taus: TaskStack, ctx: TensorContext) -> Any: ...

    def combine(self, first: Any, second: Any) -> Any: ...

    def end_pass(self, pass_index: int, total: Any) -> None: ...

    def result(self) -> Any: ...


def fold_statistics(prepass: Prepass, pass_index: int, tensors: Iterable[tuple[TaskStack, TensorContext]],
                    total: Any = None) -> Any:
    """``total`` combined, in order, with the pass-``pass_index`` statistic of every (taus, ctx)."""
    for taus, ctx in tensors:
        stat = prepass.observe(pass_index, taus, ctx)
        total = stat if total is None else prepass.combine(total, stat)
    return total


MergeFn = Callable[[TaskStack, TensorContext, Any], Tensor]


@dataclass(frozen=True)
class PerTaskUpdate:
    """Result of a per-task method (e.g. EMR) for one parameter.

    ``update`` is the unified task vector written into the output model; ``task_tensors`` maps a
    key (e.g. ``mask``) to a tensor with a leading task axis (T, *shape) stored per task. With the
    scalars of the method's pre-pass result (``task_scalars()``), :attr:`MethodSpec.rebuild` turns
    them back into task t's own update.
    """

    update: Tensor
    task_tensors: dict[str, Tensor]


RebuildFn = Callable[[Tensor, dict[str, Tensor], dict[str, float]], Tensor]


def reads_sum(fn: MergeFn) -> MergeFn:
    """Mark a merge function whose result depends on the task vectors only through Σ_t τ_t."""
    fn.reads_sum = True  # type: ignore[attr-defined]
    return fn


def is_sum_merge(fn: MergeFn) -> bool:
    """Whether ``fn`` is marked :func:`reads_sum`."""
    return getattr(fn, "reads_sum", False)


@reads_sum
def scaled_mean(taus: TaskStack, ctx: TensorContext, params: Any) -> Tensor:
    """α · mean_t τ_t: the SVD family's rule for non-matrix tensors (docs/algorithms.md, "Conventions")."""
    return params.scale * taus.mean()


@dataclass(frozen=True)
class MethodSpec:
    """A registered merging method (see the module docstring for what each field declares)."""

    name: str
    description: str
    params_model: type[MethodParams]
    merge: MergeFn
    family: Family = "svd"
    other: MergeFn = scaled_mean
    prepass: Callable[[Any], Prepass | None] | None = None
    rebuild: RebuildFn | None = None
    card: str | None = None
    svd_requests: SVDRequests | None = None
    shape_note: ShapeNote | None = None
    reads_base: bool = False
    weights: WeightsRole = "applied"
    reads_grams: GramInputs | None = None
    models: tuple[int, int | None] = (1, None)

    @property
    def per_task(self) -> bool:
        """Whether the method produces one model per task (its merge returns :class:`PerTaskUpdate`)."""
        return self.rebuild is not None

    def function_for(self, kind: str) -> MergeFn:
        """The merge function of a tensor of ``kind`` (``matrix`` or ``fallback``)."""
        return self.merge if kind == "matrix" or self.family == "elementwise" else self.other

    def parameters(self, values: dict[str, Any] | None = None) -> MethodParams:
        """Validate ``values`` against the parameter model, defaults filled in."""
        return validate(self.params_model, dict(values or {}), f"parameters of method '{self.name}'")

    def admits(self, count: int) -> bool:
        """Whether the method merges ``count`` models (its ``models`` range)."""
        least, most = self.models
        return least <= count and (most is None or count <= most)

    def check_models(self, count: int) -> None:
        """A :class:`RecipeError` unless the method merges ``count`` models (its ``models`` range)."""
        if self.admits(count):
            return
        least, most = self.models
        wanted = (f"exactly {least}" if least == most else f"at least {least}" if most is None
                  else f"{least} to {most}")
        raise RecipeError(f"method '{self.name}' merges {wanted} model{'s' if (most or least) > 1 else ''} "
                          f"besides the base; the recipe lists {count}. List that many under 'models', or pick "
                          "another method (`primerge methods`).")

    def make_prepass(self, params: MethodParams) -> Prepass | None:
        """The whole-model pass these parameters need, if any."""
        return self.prepass(params) if self.prepass is not None else None

    def apply(self, taus: Tensor | TaskStack, ctx: TensorContext, params: MethodParams) -> Tensor:
        """Merged update of one tensor (dense (T, *shape) task vectors or a stack)."""
        if self.reads_base and ctx.base is None:
            raise RecipeError(f"tensor '{ctx.name}': method '{self.name}' reads the base tensor θ₀; "
                              "give it as TensorContext(base=...).")
        stack = TaskStack.of(taus)
        self.check_models(stack.T)
        return self.function_for(ctx.kind)(stack, ctx, params)


_REGISTRY: dict[str, MethodSpec] = {}


def merge_method(name: str, params: type[MethodParams], description: str, *, family: Family = "svd",
                 other: MergeFn = scaled_mean, prepass: Callable[[Any], Prepass | None] | None = None,
                 rebuild: RebuildFn | None = None, card: str | None = None,
                 svd_requests: SVDRequests | None = None, shape_note: ShapeNote | None = None,
                 reads_base: bool = False, weights: WeightsRole = "applied",
                 reads_grams: GramInputs | None = None,
                 models: tuple[int, int | None] = (1, None)) -> Callable[[MergeFn], MergeFn]:
    """Register the decorated function as method ``name`` (see the module docstring)."""
    def register(fn: MergeFn) -> MergeFn:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = MethodSpec(name, description, params, fn, family, other, prepass, rebuild, card,
                                     svd_requests, shape_note, reads_base, weights, reads_grams, models)
        return fn
    return register


def get_method(name: str) -> MethodSpec:
    """Look a method up by name, suggesting the closest one when unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RecipeError(
            f"unknown method {quoted(name)}.{closest(str(name), _REGISTRY)} "
            f"Available: {', '.join(sorted(_REGISTRY))} (see `primerge methods`)."
        ) from None


def list_methods() -> list[MethodSpec]:
    """Every registered method, in registration order."""
    return list(_REGISTRY.values())
