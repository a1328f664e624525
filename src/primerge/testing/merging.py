"""Merging a small in-memory model as the stream does, and comparing what comes out.

:func:`merge_model` mirrors :func:`primerge.engine.stream.merge_tensor` without files: the method's
pre-pass (if its parameters need one) folds its statistics over every tensor of the model, then
each tensor's function (:meth:`MethodSpec.function_for` its kind) merges it under the pre-pass
result, receiving only Σ_t τ_t (:meth:`TaskStack.of_sum`) when it is marked ``reads_sum``.
``ship`` is applied to everything that crosses a process boundary on Ray (the spec, the
parameters, the pre-pass on its way out and its statistics on their way back, the pre-pass result,
each update): a pickle round trip there is the pickling check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from primerge.methods.base import (MergeFn, MethodParams, MethodSpec, PerTaskUpdate, TensorContext, fold_statistics,
                                   is_sum_merge)
from primerge.methods.stack import LowRank, TaskStack

Result = Tensor | PerTaskUpdate
Pairs = Iterable[tuple[TaskStack, TensorContext]]


def unchanged(value: Any) -> Any:
    """The ``ship`` of an in-process merge: nothing crosses a boundary."""
    return value


def prepass_result(spec: MethodSpec, params: MethodParams, tensors: Pairs,
                   ship: Callable[[Any], Any] = unchanged) -> Any:
    """Every pass of the method's pre-pass over ``tensors``, in order; its result (``None`` without one)."""
    prepass = spec.make_prepass(params)
    if prepass is None:
        return None
    tensors = [(taus, as_given(spec, ctx)) for taus, ctx in tensors]
    for i in range(prepass.passes):
        prepass.end_pass(i, ship(fold_statistics(ship(prepass), i, tensors)))
    return ship(prepass.result())


def merge_model(spec: MethodSpec, params: MethodParams, tensors: Pairs, *, prepass: Any = None,
                ship: Callable[[Any], Any] = unchanged) -> list[Result]:
    """The update of every (task vectors, context) pair of a model, as the stream computes it;
    the pre-pass runs over ``tensors`` unless its result is given as ``prepass``."""
    tensors = list(tensors)
    if prepass is None:
        prepass = prepass_result(spec, params, tensors, ship)
    spec, params = ship(spec), ship(params)
    return [ship(merge_one(spec.function_for(ctx.kind), params, taus, as_given(spec, ctx, prepass)))
            for taus, ctx in tensors]


def as_given(spec: MethodSpec, ctx: TensorContext, prepass: Any = None) -> TensorContext:
    """``ctx`` as the stream gives it to ``spec``: with the pre-pass result, θ₀ only for a method
    registered with ``reads_base`` and the Gram matrices only for one registered with ``reads_grams``."""
    return replace(ctx, prepass=prepass, base=ctx.base if spec.reads_base else None,
                   grams=ctx.grams if spec.reads_grams is not None else None)


def merge_one(fn: MergeFn, params: MethodParams, taus: TaskStack, ctx: TensorContext) -> Result:
    """One tensor's update by ``fn``: only Σ_t τ_t for a function marked ``reads_sum``, as the
    stream reads it."""
    if is_sum_merge(fn) and not taus.summed:
        taus = TaskStack.of_sum(taus.sum(), taus.T, taus.weights)
    return fn(taus, ctx, params)


def parts(result: Result) -> list[Tensor]:
    """The tensors of a result: the update, then a per-task update's task tensors by key."""
    if isinstance(result, PerTaskUpdate):
        return [result.update, *(result.task_tensors[k] for k in sorted(result.task_tensors))]
    return [result]


def bits(tensor: Tensor) -> Tensor:
    """The bytes of ``tensor`` (so that −0.0 and 0.0, or two NaNs, compare as stored)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def identical(first: Tensor, second: Tensor) -> bool:
    """The same shape, dtype and bytes."""
    return first.shape == second.shape and first.dtype == second.dtype and torch.equal(bits(first), bits(second))


def same_bits(first: list[Result], second: list[Result]) -> bool:
    """Whether two lists of results hold identical tensors."""
    a = [p for r in first for p in parts(r)]
    b = [p for r in second for p in parts(r)]
    return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))


def same_stack(first: TaskStack, second: TaskStack) -> bool:
    """Whether two stacks hold the same dense rows and factors, byte for byte."""
    if first.dense_index != second.dense_index or first.lowrank.keys() != second.lowrank.keys():
        return False
    pairs = [(first.dense_rows, second.dense_rows)] + [
        (tensor, other) for t, f in first.lowrank.items()
        for tensor, other in ((f.left, second.lowrank[t].left), (f.right, second.lowrank[t].right))]
    return all(identical(a, b) for a, b in pairs)


def stack_copy(taus: TaskStack) -> TaskStack:
    """A copy of a stack of rows (dense rows and factors cloned)."""
    rows = {t: LowRank(f.left.clone(), f.right.clone()) for t, f in taus.lowrank.items()}
    return TaskStack(taus.dense_rows.clone(), taus.dense_index, rows, taus.weights)
