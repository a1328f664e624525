"""The stream: pre-passes, then work units, each tensor handed to an output as it is merged.

    plan ──► pre-passes (whole-model statistics, reduced) ──► units: read → method → cast ──► sink

For every tensor of a unit: the task vectors are read (:meth:`primerge.core.plan.Plan.task_vectors`:
a :class:`~primerge.methods.stack.TaskStack`, or only Σ_t τ_t for a merge marked
:func:`~primerge.methods.base.reads_sum`), the method's function for the tensor's treatment
gives the update, LiNeS scales it, and θ₀ + update is cast to the stored dtype. Executing a unit
(:func:`execute_unit`) is a pure function of (plan, unit, pre-pass result, device), so units can
run on other processes or machines; a pre-pass is a fold of per-tensor statistics in plan order
(:class:`~primerge.methods.base.Prepass`), the same whichever way the units are split. Nothing
about file formats lives here.

Peak memory is about (T + 2) x the largest tensor plus what the output buffers (one shard); it
does not grow with the number of layers. A value problem found while streaming (NaN/Inf) aborts
the merge, and a folder output removes its temporary folder, so nothing partial is ever left.
"""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from primerge.util.deterministic import ThreadIndependent
from primerge.util.platform import machine_kind
from primerge.util.errors import InputError, RecipeError
from primerge.io.manifest import non_finite
from primerge.linalg import OutputPrecision, SVDOutcomes, choose_svd, recording
from primerge.linalg.certificate import tolerant
from primerge.methods.base import PerTaskUpdate, Prepass, TensorContext, fold_statistics, is_sum_merge
from primerge.methods.stack import TaskStack
from primerge.output.base import MergedTensor, MergedUpdate, MergeResult, PerTaskTensor, Sink, UnitWriter
from primerge.core.plan import Plan, WorkUnit
from primerge.util.seeding import derive_seed
from primerge.core.sources import PlanEntry
from primerge.core.treatments import matrix_inputs, merge_function


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` (or ``cuda:N``) or ``auto`` (CUDA when available); anything else,
    or a CUDA device that is not there, is a :class:`RecipeError`."""
    if not isinstance(device, str):
        raise RecipeError(f"device must be text (cpu, cuda, cuda:N or auto), not {type(device).__name__}.")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = re.fullmatch(r"cpu|cuda(?::(\d{1,4}))?", device)
    if match is None:
        raise RecipeError(f"unsupported device '{device[:40]}'; use cpu, cuda, cuda:N or auto.")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RecipeError("--device cuda was requested but no CUDA device is available; use cpu.")
        if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
            raise RecipeError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices.")
    return torch.device(device)


def context(plan: Plan, entry: PlanEntry, prepass: Any = None, base: torch.Tensor | None = None) -> TensorContext:
    """What the method knows of ``entry``: treatment, seed from the recipe seed and its name,
    θ₀ (``base``) when the method is registered with ``reads_base``, and the plan's input Gram
    matrices of a 2-D matrix when it carries them (a data-aware method, ``reads_grams``), and how
    finely the result is written when ``svd: auto`` decomposes it (:func:`output_precision`)."""
    kind = "fallback" if entry.kind == "fallback" else "matrix"
    theta = base if plan.recipe.spec.reads_base else None
    grams = plan.grams(entry.name) if plan.grams is not None and entry.kind == "matrix" else None
    precision = output_precision(entry, base) if kind == "matrix" and _decomposes(plan, entry) else None
    return TensorContext(entry.name, kind, derive_seed(plan.recipe.seed, entry.name), prepass, theta, grams,
                         precision)


def output_precision(entry: PlanEntry, base: torch.Tensor | None) -> OutputPrecision | None:
    """The stored dtype of ``entry`` (its FP8 format when quantized) and θ₀'s scale: what the
    certificate of ``svd: auto`` compares a block Krylov SVD's backward error with."""
    if base is None or not entry.dtype.is_floating_point:
        return None
    return OutputPrecision.of(stored_dtype(entry), base)


def stored_dtype(entry: PlanEntry) -> torch.dtype:
    """The dtype ``entry`` is written in: its FP8 format when quantized, else its dtype."""
    return entry.storage.dtype if entry.storage is not None else entry.dtype


def _decomposes(plan: Plan, entry: PlanEntry) -> bool:
    """Whether the method asks for truncated SVDs of ``entry`` under ``svd: auto``."""
    params = plan.tensor_parameters(entry).params
    return plan.recipe.spec.svd_requests is not None and getattr(params, "svd", None) == "auto"


def method_inputs(plan: Plan, entry: PlanEntry, device: torch.device, prepass: Any = None, *,
                  summed: bool = False) -> tuple[torch.Tensor, TaskStack, TensorContext]:
    """θ₀, the task vectors of ``entry`` as the method declares it reads them (weights applied or
    given, only their sum with ``summed``) and its context."""
    weighted = plan.recipe.spec.weights == "applied"
    base, taus = plan.task_vectors(entry, device, summed=summed, weighted=weighted)
    return base, taus, context(plan, entry, prepass, base)


def prepass_statistics(plan: Plan, prepass: Prepass, pass_index: int, entries: Iterable[PlanEntry],
                       device: torch.device) -> Any:
    """The fold (``prepass.combine``) of the statistics of ``entries`` in pass ``pass_index``
    (a tensor of several matrices is observed matrix by matrix, :func:`primerge.core.treatments.matrix_inputs`)."""
    tensors = (pair for e in entries if e.kind != "copy"
               for pair in matrix_inputs(e, *method_inputs(plan, e, device)[1:]))
    return fold_statistics(prepass, pass_index, tensors)


def fold_units(prepass: Prepass, parts: Iterable[Any]) -> Any:
    """The fold (``prepass.combine``) of per-unit statistics, in unit order (``None`` for none)."""
    total = None
    for part in parts:
        if part is not None:
            total = part if total is None else prepass.combine(total, part)
    return total


def run_prepass(plan: Plan, device: torch.device, quiet: bool = True) -> Any:
    """Every pass of the method's whole-model pre-pass, unit by unit in this process; its result."""
    prepass = plan.recipe.spec.make_prepass(plan.method_params)
    if prepass is None:
        return None
    for i in range(prepass.passes):
        units = tqdm(plan.units, desc=f"{plan.recipe.spec.name} pre-pass {i + 1}/{prepass.passes}", unit="unit",
                     disable=quiet, leave=False)
        prepass.end_pass(i, fold_units(prepass, (prepass_statistics(plan, prepass, i, u.entries, device)
                                                 for u in units)))
    return prepass.result()


def merge_tensor(plan: Plan, entry: PlanEntry, device: torch.device, prepass: Any = None) -> MergedTensor:
    """One output tensor: copied from the base, or θ₀ + update in the stored format."""
    if entry.kind == "copy":
        value, companions = plan.copied(entry)
        return MergedTensor(entry.name, value, entry.kind, companions=companions)
    spec, params = plan.recipe.spec, plan.tensor_parameters(entry).params
    merge = merge_function(spec, entry)
    base, taus, ctx = method_inputs(plan, entry, device, prepass, summed=is_sum_merge(merge))
    update = merge(taus, ctx, params)
    del taus
    per_task = update if isinstance(update, PerTaskUpdate) else None
    if per_task is not None:
        update = per_task.update
    if plan.scales is not None:
        update = update * plan.scales[entry.name]
    if non_finite(update):
        raise InputError(f"tensor '{entry.name}': method '{spec.name}' produced NaN/Inf; check the inputs "
                         f"and parameters ({params.model_dump()}).")
    value, companions = entry.store(base + update)
    if per_task is None:
        return MergedUpdate(entry.name, value, entry.kind, update, companions=companions)
    unified = update.to(dtype=entry.dtype, device="cpu")
    tensors = {k: v.cpu() for k, v in per_task.task_tensors.items()}
    return PerTaskTensor(entry.name, value, entry.kind, unified, tensors)


def execute_unit(plan: Plan, unit: WorkUnit, device: torch.device, prepass: Any = None) -> Iterator[MergedTensor]:
    """The tensors of one unit, in order: a pure function of (plan, unit, pre-pass result)."""
    for entry in unit.entries:
        yield merge_tensor(plan, entry, device, prepass)


def progress(plan: Plan, quiet: bool, what: str = "merge"):
    """A progress bar over the plan's stored bytes (units differ in size; bytes track the work)."""
    return tqdm(total=sum(u.nbytes for u in plan.units), desc=f"{what} [{plan.recipe.spec.name}]", unit="B",
                unit_scale=True, unit_divisor=1024, disable=quiet)


class Executor(Protocol):
    """Where units run: this process (:class:`LocalExecutor`) or a cluster (:mod:`primerge.engine.executors`).

    ``prepass`` runs the method's whole-model pass; ``units`` yields (unit, receipt) in unit order,
    each receipt made by ``writer`` where the unit ran; ``describe`` is what the model card records.
    """

    def prepass(self, plan: Plan, quiet: bool) -> Any: ...

    def units(self, plan: Plan, prepass: Any, writer: UnitWriter, quiet: bool) -> Iterator[tuple[WorkUnit, Any]]: ...

    def describe(self) -> dict: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Units run one after the other in this process, on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.units_run = 0

    def prepass(self, plan: Plan, quiet: bool) -> Any:
        return run_prepass(plan, self.device, quiet)

    def units(self, plan: Plan, prepass: Any, writer: UnitWriter, quiet: bool) -> Iterator[tuple[WorkUnit, Any]]:
        with progress(plan, quiet) as bar:
            for unit in plan.units:
                yield unit, writer.write(unit, self._tensors(plan, unit, prepass, bar))
                self.units_run += 1

    def _tensors(self, plan: Plan, unit: WorkUnit, prepass: Any, bar) -> Iterator[MergedTensor]:
        for entry, merged in zip(unit.entries, execute_unit(plan, unit, self.device, prepass)):
            bar.set_postfix_str(entry.name, refresh=False)
            bar.update(entry.nbytes)
            yield merged

    def describe(self) -> dict:
        return {"backend": "local", "device": str(self.device), "machine_kinds": {machine_kind(self.device): self.units_run}}

    def close(self) -> None:
        """Nothing to release."""


def matrix_shapes(plan: Plan) -> Counter[tuple[int, int]]:
    """How many matrices of each shape the method's matrix function will see (an expert tensor
    [E, m, n] counts E of m × n)."""
    shapes: Counter[tuple[int, int]] = Counter()
    for (shape, _, _), count in _shapes_and_parameters(plan).items():
        shapes[shape] += count
    return shapes


def _shapes_and_parameters(plan: Plan) -> Counter[tuple[tuple[int, int], int, bool]]:
    """:func:`matrix_shapes` per set of resolved parameters and kind of output: (shape, set index,
    16-bit output) -> matrices; the sets are those of :attr:`Plan.parameters` (index 0 for a plan
    without a table); a 16-bit output lets ``svd: auto`` certify (:func:`primerge.linalg.choose_svd`)."""
    counted: Counter[tuple[tuple[int, int], int, bool]] = Counter()
    index = plan.parameters.index if plan.parameters is not None else {}
    for entry in plan.mergeable():
        shape = tuple(entry.view[1:]) if entry.view is not None else entry.shape
        if entry.kind != "fallback" and len(shape) == 2:
            key = (shape, index.get(entry.name, 0), tolerant(stored_dtype(entry)))
            counted[key] += entry.view[0] if entry.view is not None else 1
    return counted


def _set(plan: Plan, i: int):
    """The parameters of set ``i`` (:func:`_shapes_and_parameters`)."""
    return plan.parameters.distinct[i].params if plan.parameters is not None else plan.recipe.params


def svd_choices(plan: Plan, prepass: Any = None) -> list[str]:
    """What ``svd: auto`` does for every distinct truncated SVD the merge asks for, one line each.

    The method's ``svd_requests`` give (batch shape, rank) per matrix shape (dense task vectors:
    LoRA rows take the factored SVD instead); :func:`primerge.linalg.choose_svd` decides from
    those shapes alone, so the lines are known before any tensor is read, except for ranks that
    the pre-pass chooses (given its result as ``prepass``).
    """
    spec = plan.recipe.spec
    if spec.svd_requests is None:
        return []
    matrices: Counter[tuple[tuple[int, ...], int, bool]] = Counter()
    for (shape, i, sixteen), count in _shapes_and_parameters(plan).items():
        if getattr(_set(plan, i), "svd", None) != "auto":
            continue
        for request in spec.svd_requests(shape, len(plan.sources), _set(plan, i), prepass):
            matrices[(*request, sixteen)] += count
    lines = []
    for (batch, rank, sixteen), count in matrices.items():
        choice = choose_svd(batch, rank, sixteen)
        lines.append(f"svd: auto: {choice.mode} SVD of {'×'.join(map(str, batch))} at rank {rank} "
                     f"({_matrices(count)}): {choice.reason}")
    return lines


def shape_notes(plan: Plan) -> list[str]:
    """The method's ``shape_note`` for every distinct matrix shape that has one (e.g. PRIME's rank
    capped on narrow matrices), with the number of matrices."""
    spec = plan.recipe.spec
    if spec.shape_note is None:
        return []
    notes: Counter[str] = Counter()
    for (shape, i, _), count in _shapes_and_parameters(plan).items():
        if note := spec.shape_note(shape, len(plan.sources), _set(plan, i)):
            notes[note] += count
    return [f"{note} ({_matrices(count)})" for note, count in notes.items()]


def _announce(lines: list[str], quiet: bool) -> None:
    if not quiet:
        for line in lines:
            tqdm.write(line, file=sys.stderr)


def _matrices(count: int) -> str:
    return f"{count} matri{'ces' if count != 1 else 'x'}"


def run(plan: Plan, sink: Sink, executor: Executor, quiet: bool = True) -> MergeResult:
    """Pre-passes, then every unit through ``executor`` into ``sink``; returns what the merge produced.
    What the merge decides from the shapes alone (:func:`svd_choices`, :func:`shape_notes`) is kept
    in the result and, unless ``quiet``, written to stderr before anything is merged."""
    start = time.perf_counter()
    spec = plan.recipe.spec
    result = MergeResult(spec.name, plan.reported_parameters(), counts=plan.counts(),
                         per_task=spec.per_task, decisions=svd_choices(plan) + shape_notes(plan),
                         parameter_table=plan.parameter_rows())
    _announce(result.decisions, quiet)
    with ThreadIndependent():  # byte-identical outputs whatever the thread count
        prepass = executor.prepass(plan, quiet)
        if hasattr(prepass, "to_markdown"):
            result.report = prepass.to_markdown()
        if prepass is not None:  # SVDs whose rank the pre-pass chose
            later = [line for line in svd_choices(plan, prepass) if line not in result.decisions]
            result.decisions += later
            _announce(later, quiet)
        outcomes = SVDOutcomes()
        with sink.session(plan, prepass):
            for unit, (receipt, unit_outcomes) in executor.units(plan, prepass, TallyingWriter(sink.unit_writer()),
                                                                  quiet):
                sink.receive(unit, receipt)
                outcomes += unit_outcomes
            result.execution = executor.describe()
            result.svd, result.prepass_svd = outcomes, getattr(prepass, "svd_outcomes", SVDOutcomes())
            _announce(result.svd.lines() + result.svd.timing() + result.prepass_svd.lines("pre-pass")
                      + result.prepass_svd.timing("pre-pass"), quiet)
            sink.finish(result)
    result.seconds = time.perf_counter() - start
    return result


class TallyingWriter:
    """The sink's unit writer, whose receipt comes back with what the unit's truncated SVDs did
    (:class:`primerge.linalg.SVDOutcomes`, recorded where the unit runs: picklable, summed by the run)."""

    def __init__(self, inner: UnitWriter) -> None:
        self.inner = inner
        self.folder = getattr(inner, "folder", None)  # where a folder writer writes (executors check it)

    def write(self, unit: WorkUnit, tensors: Iterable[MergedTensor]) -> tuple[Any, SVDOutcomes]:
        with recording() as outcomes:
            receipt = self.inner.write(unit, tensors)
        return receipt, outcomes
