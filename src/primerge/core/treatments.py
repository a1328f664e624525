"""Treatments: how each output tensor is merged, and matrix merges of tensors that hold several matrices.

:func:`classify` gives every base tensor one treatment (the recipe's :meth:`~primerge.core.recipe.Recipe.layout`
on floating tensors):

- ``copy``: taken from the base (task-specific names the base has, non-floating or empty tensors);
- ``matrix``: a 2-D matrix parameter, merged by the method's matrix function;
- ``experts``: an N-D tensor (N ≥ 3) of B = ∏ shape[:-2] matrices of its last two axes (fused
  experts [E, m, n]): the method's matrix function merges each of the B matrices;
- ``reshaped``: an N-D tensor viewed as one m × (∏ shape[1:]) matrix (``flatten``, e.g. a
  convolution [out, in, kh, kw] as its out × in·kh·kw im2col matrix), merged as a matrix;
- ``fallback``: every other floating tensor (the method's function for non-matrices).

The view of ``experts`` and ``reshaped`` entries is (B, m, n). :func:`merge_function` wraps the
method's matrix function once for every method: matrix b of the result is the function applied to
the stack of the task vectors' matrix b, under the context ``<name>[b]`` (its seed derived from
the tensor's); the B results are stacked back into the tensor's shape (a per-task method's task
tensors too). So a fused [E, m, n] tensor merges exactly as the same E matrices stored as separate
2-D tensors would (up to seeds, which follow names). :func:`matrix_inputs` gives a pre-pass the
same per-matrix view.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from primerge.methods.base import MergeFn, MethodSpec, PerTaskUpdate, TensorContext, is_sum_merge, reads_sum
from primerge.methods.stack import TaskStack
from primerge.core.recipe import Recipe
from primerge.util.seeding import derive_seed
from primerge.core.sources import PlanEntry, Treatment

View = tuple[int, int, int]


def classify(recipe: Recipe, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Treatment, View | None]:
    """The treatment of one base tensor and, for ``experts`` / ``reshaped``, its (B, m, n) view."""
    if recipe.is_task_specific(name) or not dtype.is_floating_point or 0 in shape:
        return "copy", None
    layout = recipe.layout(name, shape)
    if layout == "matrix" or (layout == "flatten" and len(shape) == 2):
        return "matrix", None
    if layout == "experts":
        return "experts", (math.prod(shape[:-2]), shape[-2], shape[-1])
    if layout == "flatten":
        return "reshaped", (1, shape[0], math.prod(shape[1:]))
    return "fallback", None


def matrix_context(ctx: TensorContext, index: int, view: View) -> TensorContext:
    """The context of matrix ``index`` of a tensor viewed as ``view``: name ``<name>[index]``, kind
    matrix, its own seed, and its matrix of θ₀ when the context carries θ₀."""
    base = None if ctx.base is None else ctx.base.reshape(view)[index]
    return TensorContext(f"{ctx.name}[{index}]", "matrix", derive_seed(ctx.seed, index), ctx.prepass, base,
                         precision=ctx.precision)


def split(taus: TaskStack, view: View) -> list[TaskStack]:
    """The stacks of the B matrices of ``view`` (B, m, n): dense rows, or sums when only Σ_t τ_t is
    known; each carries the models' weights."""
    if taus.summed:
        total = taus.sum().reshape(view)
        return [TaskStack.of_sum(total[b].contiguous(), taus.T, taus.weights) for b in range(view[0])]
    rows = taus.dense().reshape(taus.T, *view)
    return [TaskStack.of(rows[:, b].contiguous(), taus.weights) for b in range(view[0])]


def assemble(parts: list[Tensor | PerTaskUpdate], shape: tuple[int, ...]) -> Tensor | PerTaskUpdate:
    """The B per-matrix results stacked into the tensor's ``shape`` (task tensors (T, *shape))."""
    if not isinstance(parts[0], PerTaskUpdate):
        return torch.stack(parts).reshape(shape)
    update = torch.stack([p.update for p in parts]).reshape(shape)
    tensors = {key: torch.stack([p.task_tensors[key] for p in parts], 1).reshape(-1, *shape)
               for key in parts[0].task_tensors}
    return PerTaskUpdate(update, tensors)


def merge_function(spec: MethodSpec, entry: PlanEntry) -> MergeFn:
    """The method's function for ``entry``: as registered, or its matrix function per matrix of the view."""
    if entry.view is None:
        return spec.function_for(entry.kind)
    matrix = spec.function_for("matrix")
    view = entry.view

    def per_matrix(taus: TaskStack, ctx: TensorContext, params) -> Tensor | PerTaskUpdate:
        parts = [matrix(stack, matrix_context(ctx, b, view), params) for b, stack in enumerate(split(taus, view))]
        return assemble(parts, entry.shape)

    return reads_sum(per_matrix) if is_sum_merge(matrix) else per_matrix


def matrix_inputs(entry: PlanEntry, taus: TaskStack, ctx: TensorContext) -> Iterator[tuple[TaskStack, TensorContext]]:
    """What a pre-pass observes of ``entry``: (taus, ctx), or one pair per matrix of its view."""
    if entry.view is None:
        yield taus, ctx
        return
    for b, stack in enumerate(split(taus, entry.view)):
        yield stack, matrix_context(ctx, b, entry.view)
