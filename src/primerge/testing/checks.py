"""The properties every merging method must have, one small function each (the manual is
:mod:`primerge.testing`).

A check takes the method's spec and validated parameters and raises :class:`AssertionError` with
what it saw; :func:`primerge.testing.run_check` names the method and the property. Inputs are the
tiny stacks of :mod:`primerge.testing.inputs`, as many tasks as :attr:`Tags.tasks`; merges run as
the stream runs them (:func:`primerge.testing.merging.merge_model`).
"""

from __future__ import annotations

import pickle
import random
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from safetensors.torch import save_file

from primerge.api import merge
from primerge.core.sources import PlanEntry
from primerge.core.treatments import assemble, matrix_context, matrix_inputs, merge_function
from primerge.linalg import truncated
from primerge.methods.base import MethodParams, MethodSpec, PerTaskUpdate, get_method, is_sum_merge
from primerge.methods.stack import TaskStack
from primerge.testing.inputs import (BIAS, MATRIX, SEED, TASKS, Model, context, equal_sum_pair, lowrank_stack,
                                     mixed_stack, stock_model, structured, zero_stacks)
from primerge.testing.merging import (Result, as_given, merge_model, merge_one, parts, prepass_result, same_bits,
                                      same_stack, stack_copy)
from primerge.util.errors import PrimergeError
from primerge.util.seeding import derive_seed

#: LoRA factors against their dense product: ‖a − b‖ ≤ FACTORED_TOLERANCE ‖b‖ per tensor. Both
#: paths are backward-stable float32 decompositions (unit round-off u ≈ 6e-8) of matrices whose
#: singular values are 0.1 apart at least (inputs.SPECTRA), so by Wedin's theorem their subspaces
#: agree to about √(m n) u / 0.1 ≈ 1e-5; products of such factors stay within 1e-4.
FACTORED_TOLERANCE = 1e-4
#: The matrix of the thread check: wide enough that LAPACK's and the BLAS's splits over threads
#: change the bits of the SVD methods unless the merge runs under ThreadIndependent as the stream does.
THREADED = (96, 64)
#: Odd shapes every method meets in real models: single rows and columns, a 1 × 1 matrix, a bias, a scalar.
ODD_SHAPES = ((1, 7), (7, 1), (1, 1), (6, 9), (5,), ())


@dataclass(frozen=True)
class Tags:
    """What a method declares (its :class:`MethodSpec` and parameters), which decides the checks."""

    tasks: int                  # task vectors the checks merge: 3, or the nearest count ``models`` allows
    one_task: bool              # one task allowed (``models``) and no parameter given per task fixes T
    per_task: bool              # ``rebuild``: a model per task (PerTaskUpdate)
    prepass: bool               # a whole-model pass for these parameters
    sum_kinds: tuple[str, ...]  # tensor kinds whose function is marked ``reads_sum``
    factored: bool              # the matrix function reads the stack, so LoRA rows reach it as factors
    svd_mode: bool              # parameters with an ``svd`` field (auto | exact | randomized)
    reads_grams: bool           # needs each task's data: no merge from files alone


def method_tags(spec: MethodSpec, params: MethodParams) -> Tags:
    """The tags of ``spec`` under ``params``."""
    least, most = spec.models
    tasks = max(least, min(TASKS, most or TASKS))
    per_task_list = any(isinstance(value, list) for value in params.model_dump().values())
    sums = tuple(kind for kind in ("matrix", "fallback") if is_sum_merge(spec.function_for(kind)))
    return Tags(tasks, least <= 1 and not per_task_list, spec.per_task, spec.make_prepass(params) is not None,
                sums, "matrix" not in sums, "svd" in type(params).model_fields, spec.reads_grams is not None)


def with_seed(model: Model, recipe_seed: int) -> Model:
    """The same task vectors with contexts seeded from another recipe seed."""
    return [(taus, replace(ctx, seed=derive_seed(recipe_seed, ctx.name))) for taus, ctx in model]


# ---------------------------------------------------------------------------------- the checks


def check_shapes(spec: MethodSpec, params: MethodParams) -> None:
    """Every update has its tensor's shape and is finite, on odd shapes, with one task where the
    method takes one, and with duplicated tasks (a model merged with itself)."""
    tags = method_tags(spec, params)
    cases = [(1, False)] * tags.one_task + [(tags.tasks, False)] + [(tags.tasks, True)] * (tags.tasks > 1)
    for tasks, duplicate in cases:
        model = []
        for i, shape in enumerate(ODD_SHAPES):
            taus = structured(tasks, shape, SEED + i)
            if duplicate:
                taus[1] = taus[0]
            model.append((TaskStack.of(taus), context(f"odd{i}.weight", shape, tasks)))
        for (taus, ctx), result in zip(model, merge_model(spec, params, model)):
            where = f"{ctx.kind} of shape {tuple(taus.tensor_shape)}, {tasks} task(s)" + ", duplicated" * duplicate
            check_result(spec, taus, result, where)


def check_result(spec: MethodSpec, taus: TaskStack, result: Result, where: str) -> None:
    """A Tensor update (a PerTaskUpdate for a method with ``rebuild``) of the tensor's shape, finite;
    task tensors (T, *shape)."""
    assert isinstance(result, PerTaskUpdate) == spec.per_task, \
        f"{where}: returned {type(result).__name__}; a method with rebuild returns PerTaskUpdate, others a Tensor"
    update = parts(result)[0]
    assert update.shape == taus.tensor_shape, f"{where}: update of shape {tuple(update.shape)}"
    assert update.is_floating_point() and bool(torch.isfinite(update).all()), f"{where}: non-finite update"
    for key, tensor in getattr(result, "task_tensors", {}).items():
        assert tensor.shape == taus.shape, f"{where}: task tensor '{key}' of shape {tuple(tensor.shape)}"


def check_zero(spec: MethodSpec, params: MethodParams) -> None:
    """Zero task vectors (models equal to the base), dense or as rank-0 / zero-B factors, give an
    update of exact zeros, and a per-task method rebuilds every task's update as zeros."""
    tasks = method_tags(spec, params).tasks
    bias = zero_stacks(BIAS, tasks)[0]
    for matrix in zero_stacks(MATRIX, tasks):
        model = [(matrix, context("layer.weight", MATRIX, tasks)), (bias, context("layer.bias", BIAS, tasks))]
        results = merge_model(spec, params, model)
        form = "factored" if matrix.factored else "dense"
        for (_, ctx), result in zip(model, results):
            update = parts(result)[0]
            assert not update.any(), \
                f"{form} zero task vectors of {ctx.kind} '{ctx.name}': update ‖·‖ = {update.norm():.3g}"
        if spec.per_task:
            check_rebuilt_zero(spec, params, model, results)


def check_rebuilt_zero(spec: MethodSpec, params: MethodParams, model: Model, results: list[Result]) -> None:
    """Every task's own update, rebuilt from a per-task result on zero task vectors, is zero."""
    scalars = prepass_result(spec, params, model).task_scalars()
    for result in results:
        for t, own_scalars in enumerate(scalars):
            own = spec.rebuild(result.update, {k: v[t] for k, v in result.task_tensors.items()}, own_scalars)
            assert not own.any(), f"task {t} rebuilt from zero task vectors is not zero"


def check_reads_sum(spec: MethodSpec, params: MethodParams) -> None:
    """A function marked ``reads_sum`` gives the same bits for two stacks with the same sum and for
    the sum alone (:meth:`TaskStack.of_sum`, what the stream hands it)."""
    tags = method_tags(spec, params)
    for kind in tags.sum_kinds:
        shape = MATRIX if kind == "matrix" else BIAS
        first, second = equal_sum_pair(shape, tags.tasks)
        ctx = context(f"sum.{kind}", shape, tags.tasks, kind)
        ctx = as_given(spec, ctx, prepass_result(spec, params, [(first, ctx)]))
        fn = spec.function_for(kind)
        given = {"sum": TaskStack.of_sum(first.sum(), first.T), "stack A": first, "stack B (same sum)": second}
        results = {k: [fn(taus, ctx, params)] for k, taus in given.items()}
        for name in ("stack A", "stack B (same sum)"):
            assert same_bits(results["sum"], results[name]), \
                f"the {kind} function is marked reads_sum but its result on {name} differs from its result on Σ_t τ_t"


def check_factored(spec: MethodSpec, params: MethodParams) -> None:
    """Task vectors given as LoRA factors (mixed with a dense one, or all factored) merge like
    their dense form, within :data:`FACTORED_TOLERANCE` (the stream hands a LoRA adapter's
    matrices to the method as factors)."""
    tasks = method_tags(spec, params).tasks
    for name, stack in (("mixed factors and dense", mixed_stack(tasks)), ("all factors", lowrank_stack(tasks))):
        ctx = context("lora.weight", MATRIX, tasks)
        factored = merge_model(spec, params, [(stack, ctx)])
        dense = merge_model(spec, params, [(TaskStack.of(stack.dense()), ctx)])
        for i, (got, want) in enumerate(zip(parts(factored[0]), parts(dense[0]))):
            got, want = got.double(), want.double()
            error = float((got - want).norm())
            assert error <= FACTORED_TOLERANCE * float(want.norm()), \
                f"{name}: part {i} is {error:.3g} from the dense merge (‖dense‖ = {float(want.norm()):.3g})"


def check_experts(spec: MethodSpec, params: MethodParams) -> None:
    """A fused experts tensor [E, m, n] merges exactly as its E matrices stored apart would, each
    under its own context (name ``<name>[e]``, seed derived from the tensor's), pre-pass included."""
    tasks, experts, (m, n) = method_tags(spec, params).tasks, 3, (12, 8)
    taus = torch.stack([structured(tasks, (m, n), SEED + e) for e in range(experts)], dim=1)
    entry = PlanEntry("mlp.experts.weight", "experts", (experts, m, n), torch.float32, view=(experts, m, n))
    ctx, stack = context(entry.name, entry.shape, tasks, "matrix"), TaskStack.of(taus)
    prepass = prepass_result(spec, params, matrix_inputs(entry, stack, ctx))
    fused = merge_one(merge_function(spec, entry), params, stack, as_given(spec, ctx, prepass))
    apart = [(TaskStack.of(taus[:, e].contiguous()), matrix_context(ctx, e, entry.view)) for e in range(experts)]
    separate = assemble(merge_model(spec, params, apart, prepass=prepass), entry.shape)
    assert same_bits([fused], [separate]), "the fused tensor's update differs from its matrices merged apart"


def check_seed(spec: MethodSpec, params: MethodParams) -> None:
    """Same seed, same bits, whatever the global random state (never consumed); generators a method
    draws from are seeded from ``ctx.seed``, so its draws change with it. Run as given and, with an
    ``svd`` parameter, with ``svd: randomized`` (the seeded path)."""
    tags = method_tags(spec, params)
    settings = [params]
    if tags.svd_mode and params.svd != "randomized":
        settings.append(params.model_copy(update={"svd": "randomized"}))
    for setting in settings:
        label = f"svd: {setting.svd}: " if setting is not params else ""
        model = stock_model(tags.tasks)
        with recorded_seeds() as drawn:
            first = untouched_global_rng(lambda: merge_model(spec, setting, model), 1, label)
        with recorded_seeds() as drawn_elsewhere:
            merge_model(spec, setting, with_seed(model, SEED + 1))
        again = untouched_global_rng(lambda: merge_model(spec, setting, model), 2, label)
        assert same_bits(first, again), f"{label}two runs with the same seeds give different bits"
        assert not drawn or drawn != drawn_elsewhere, f"{label}seeds its generators with constants, not from ctx.seed"


def untouched_global_rng(run: Callable[[], Any], state: int, label: str) -> Any:
    """``run()`` after seeding the global generators (torch, numpy, random) with ``state``; fails if
    it consumed them. The caller's global random states are restored."""
    saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        torch.manual_seed(state), np.random.seed(state), random.seed(state)
        before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
        result = run()
        after = torch.get_rng_state(), np.random.get_state()[1], random.getstate()
    finally:
        torch.set_rng_state(saved[0]), np.random.set_state(saved[1]), random.setstate(saved[2])
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2], \
        f"{label}draws from a global random generator (torch, numpy or random); draw from " \
        "torch.Generator().manual_seed(ctx.seed)"
    return result


@contextmanager
def recorded_seeds() -> Iterator[list[int]]:
    """The seeds every ``torch.Generator`` created meanwhile is seeded with, in order."""
    seeds: list[int] = []

    class Recording(torch.Generator):
        def manual_seed(self, seed: int) -> torch.Generator:
            seeds.append(int(seed))
            return super().manual_seed(seed)

    with mock.patch.object(torch, "Generator", Recording):
        yield seeds


def check_inputs_unchanged(spec: MethodSpec, params: MethodParams) -> None:
    """The task vectors handed over (dense rows, factors) hold the same bits after the merge."""
    tasks = method_tags(spec, params).tasks
    for model in (stock_model(tasks), [(mixed_stack(tasks), context("lora.weight", MATRIX, tasks))]):
        copies = [stack_copy(taus) for taus, _ in model]
        merge_model(spec, params, model)
        for (taus, ctx), copy in zip(model, copies):
            assert same_stack(taus, copy), f"the task vectors of '{ctx.name}' were modified in place"


def check_pickling(spec: MethodSpec, params: MethodParams) -> None:
    """What a Ray worker receives and returns survives serialisation: the parameters equal, and a
    merge whose spec, parameters, pre-pass (sent for every pass), statistics, pre-pass result and
    updates each make a round trip gives the same bits as one that stays in-process."""
    model = stock_model(method_tags(spec, params).tasks)
    try:
        assert shipped(params) == params, "the parameters differ after a round trip"
        travelled = merge_model(spec, params, model, ship=shipped)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise AssertionError(f"does not pickle ({exc}); keep locks, open files and other live objects out of the "
                             "spec, the parameters and the pre-pass") from exc
    assert same_bits(travelled, merge_model(spec, params, model)), \
        "a merge whose inputs were pickled (as on a Ray worker) gives other bits"


def shipped(value: Any) -> Any:
    """``value`` after a round trip through Ray's serialiser (cloudpickle; the standard pickle,
    which is stricter, where it is not installed)."""
    try:
        import cloudpickle as serialiser
    except ImportError:
        serialiser = pickle
    return pickle.loads(serialiser.dumps(value))


def check_threads(spec: MethodSpec, params: MethodParams) -> None:
    """The same bits with 1 and with 2 torch threads (the stream merges under ThreadIndependent)."""
    model = stock_model(method_tags(spec, params).tasks, matrix=THREADED)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(merge_model(spec, params, model))
    finally:
        torch.set_num_threads(threads)
    assert same_bits(*results), "1 and 2 threads give different bits"


def check_svd_requests(spec: MethodSpec, params: MethodParams) -> None:
    """With ``svd: auto``, the truncated SVDs the matrix function asks for are exactly those its
    ``svd_requests`` declares (the merge announces ``auto``'s choice for each before it starts)."""
    tags = method_tags(spec, params)
    if tags.svd_mode:
        params = params.model_copy(update={"svd": "auto"})
    model = stock_model(tags.tasks)[:1]
    prepass = prepass_result(spec, params, model)
    asked: set[tuple[tuple[int, ...], int]] = set()
    choose = truncated.choose_svd

    def recorded(shape: tuple[int, ...], rank: int, tolerant: bool = False):
        asked.add((tuple(shape), rank))
        return choose(shape, rank, tolerant)

    with mock.patch.object(truncated, "choose_svd", recorded):
        merge_model(spec, params, model, prepass=prepass)
    declared = spec.svd_requests(MATRIX, tags.tasks, params, prepass) if spec.svd_requests else []
    declared = {(tuple(batch), rank) for batch, rank in declared}
    assert asked == declared, f"asks truncated SVDs (batch shape, rank) {sorted(asked)} but declares {sorted(declared)}"


def check_non_finite(spec: MethodSpec, params: MethodParams) -> None:
    """A merge through the engine of models whose task vector holds NaN (a matrix) or Inf (a bias)
    is refused where it is read, with primerge's error naming the tensor, along the method's own
    read path (the sum, the stack, θ₀, the pre-pass)."""
    assert get_method(spec.name) is spec, f"is not registered as '{spec.name}' (merge_method), so no recipe can name it"
    tasks = method_tags(spec, params).tasks
    for name, bad in (("layer.weight", float("nan")), ("layer.bias", float("inf"))):
        with tempfile.TemporaryDirectory() as folder:
            base, models = written_models(Path(folder), tasks, name, bad)
            try:
                merge(base, models, spec.name, parameters=params.model_dump(exclude_unset=True), quiet=True)
            except PrimergeError as exc:
                assert f"'{name}'" in str(exc) and "NaN or Inf" in str(exc), f"{bad} in '{name}': refused with: {exc}"
                continue
        raise AssertionError(f"{bad} in a task vector of '{name}' was merged without an error")


def written_models(folder: Path, tasks: int, name: str, bad: float) -> tuple[Path, list[Path]]:
    """A base and ``tasks`` fine-tunes as safetensors files in ``folder``, ``bad`` in one entry of
    tensor ``name`` of the last."""
    g = torch.Generator().manual_seed(SEED)
    base = {"layer.weight": torch.randn(*MATRIX, generator=g), "layer.bias": torch.randn(*BIAS, generator=g)}
    paths = []
    for t in range(tasks + 1):
        state = {k: v + 0.1 * t * torch.randn(v.shape, generator=g) for k, v in base.items()}
        if t == tasks:
            state[name].view(-1)[1] = bad
        save_file(state, str(folder / f"model{t}.safetensors"))
        paths.append(folder / f"model{t}.safetensors")
    return paths[0], paths[1:]
