"""Pre-flight: what a merge will do and whether it fits, from the headers (``primerge plan``,
``primerge merge --dry-run``), and the refusal of a merge that cannot fit before it starts.

The report lists every input (architecture, stored dtypes, quantization, vocabulary), the tensors
per treatment, what was reconciled between the models and the base (names, tied heads,
vocabularies) and three estimates:

- **peak memory** ≈ baseline (this process now) + the largest tensor's working set + the output's
  buffer. A tensor of N elements merged from T models holds float32 copies of it, affine in T:
  4·N·(a + b·T + r) bytes, (a, b) per method and r for how the inputs store it
  (:mod:`primerge.engine.memory_model`, checked against measured peaks for every method and input
  kind by tests/test_reliability_memory.py); + N·T mask bytes for a per-task method. A model
  folder buffers one unit (one output shard), an in-memory merge the whole model. With
  ``--device cuda`` the working set is compared with the GPU's free memory. Available memory is
  /proc/meminfo's MemAvailable, lowered to a cgroup's limit when one is set.
- **output size**: the stored bytes of every output tensor (FP8 scales included), task heads,
  support files and a per-task method's extra files; a LoRA adapter's factors. Compared with the
  free space of the output folder's file system.
- **time**, calibrated: the method's pre-pass and merge run on a few real tensors (the smallest and
  the median one of each kind, at most ~4M elements), each kind's time fitted as a + b·cost (cost =
  elements, × √min(m, n) per matrix for SVD methods) and summed over all tensors. Reading the
  inputs is in the calibration; writing the output is not.

:func:`check_fits` raises with the numbers when the peak memory exceeds what is available (or
``max_memory``) or the output exceeds the free disk; the API calls it before every merge, local or
on Ray (where each node's memory is measured by a task there and compared with the units that run
there, :func:`ray_problems`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from primerge.util.deterministic import ThreadIndependent
from primerge.engine.memory_model import method_copies, reading_copies
from primerge.engine.stream import merge_tensor, run_prepass
from primerge.util.errors import InputError, OutputError
from primerge.io.quantized import describe, read_config, scheme_of
from primerge.io.readers import Checkpoint
from primerge.methods.base import is_sum_merge
from primerge.core.plan import Plan, WorkUnit
from primerge.core.sources import TREATMENTS
from primerge.core.sources import FullFineTune, LoraAdapter, PlanEntry, TaskVectorSource, VocabAligned
from primerge.core.assembly import ComposedCheckpoint
from primerge.core.vocabulary import AlignedBase, embedding_rows

CALIBRATION_LIMIT = 4 * 1024**2  # elements of the largest tensor a calibration merges
ROW_LABELS = {"matrix": "matrix (the method's matrix merge)", "experts": "expert tensors (E matrices each)",
              "reshaped": "flattened to one matrix", "fallback": "fallback (non-matrix merge)",
              "copy": "copied from the base", "total": "all tensors of the output",
              "task_specific": "task-specific (kept per model)",
              "vocab_aligned": "vocabulary-aligned (rows by token string)"}


def size(nbytes: float) -> str:
    """Bytes in binary units: ``512 B``, ``12.3 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


# ----------------------------------------------------------------------------------- inputs


def _checkpoint(source: TaskVectorSource) -> Checkpoint | None:
    """The weights a source reads (a fine-tune's checkpoint, an adapter's weights)."""
    if isinstance(source, VocabAligned):
        source = source.inner
    if isinstance(source, FullFineTune):
        return source.checkpoint
    return source.adapter.weights if isinstance(source, LoraAdapter) else None


def _stored(info) -> int:
    return math.prod(info.shape) * info.dtype.itemsize


def describe_input(label: str, checkpoint: Checkpoint, adapter: dict | None = None) -> str:
    """One line: name, architecture, stored dtypes (counts), vocabulary rows and tokens."""
    config = read_config(checkpoint.folder)
    arch = (config.get("architectures") or [config.get("model_type", "")])[0] or "weights file"
    if adapter is not None:
        arch = f"LoRA adapter (r={adapter.get('r')})"
    dtypes = Counter(describe(checkpoint.info(n), scheme_of(checkpoint, n)) for n in checkpoint.names)
    line = f"{label}: {arch}, " + ", ".join(f"{d} x{c}" for d, c in dtypes.most_common())
    rows = embedding_rows(checkpoint)
    if rows is not None:
        line += f"; vocabulary {rows} rows"
    return line


def input_lines(plan: Plan) -> list[str]:
    """The base and every model described (:func:`describe_input`)."""
    base = plan.base.inner if isinstance(plan.base, (AlignedBase, ComposedCheckpoint)) else plan.base
    lines = [describe_input("base", base)]
    for source in plan.sources:
        checkpoint = _checkpoint(source)
        adapter = source.adapter.config if isinstance(source, LoraAdapter) else None
        lines.append(describe_input(source.label, checkpoint, adapter) if checkpoint is not None
                     else f"{source.label}: {type(source).__name__}")
    return lines


# ------------------------------------------------------------------------------- estimates


def working_set(plan: Plan, entry: PlanEntry) -> int:
    """Bytes held while ``entry`` merges: 4·N·(a + b·T + r) (:mod:`primerge.engine.memory_model`),
    and N·T bytes more for a per-task method's masks."""
    tasks, numel = len(plan.sources), math.prod(entry.shape)
    spec = plan.recipe.spec
    merge = spec.function_for("fallback" if entry.kind == "fallback" else "matrix")
    copies = method_copies(spec.name, spec.family, tasks) if not is_sum_merge(merge) else method_copies(
        "task_arithmetic", "elementwise", tasks)
    inputs = [plan.base, *(c for c in map(_checkpoint, plan.sources) if c is not None)]
    stored = [c.info(entry.name) for c in inputs if entry.name in c]
    quantized = any(scheme_of(c, entry.name) is not None for c in inputs if entry.name in c)
    aligned = plan.vocabulary is not None and entry.name in plan.vocabulary.tensors and plan.vocabulary.aligned
    factored = any(isinstance(s.inner if isinstance(s, VocabAligned) else s, LoraAdapter) for s in plan.sources)
    copies += reading_copies([info.dtype.itemsize for info in stored], quantized, aligned, factored)
    extra = tasks * numel if spec.per_task else 0
    return math.ceil(4 * numel * copies) + extra


def baseline_memory() -> int:
    """Resident bytes of this process now (0 where /proc is missing)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def available_memory() -> int | None:
    """MemAvailable, lowered to the cgroup's remaining limit when there is one; ``None`` if unknown."""
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    for limit, usage in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            cap = int(Path("/sys/fs/cgroup", limit).read_text()) - int(Path("/sys/fs/cgroup", usage).read_text())
        except (OSError, ValueError):
            continue
        available = min(available, max(cap, 0))
    return available


def output_bytes(plan: Plan) -> int:
    """Bytes the output folder will hold (see the module docstring)."""
    fmt, entries = plan.recipe.output.format, plan.entries
    heads = sum(_stored(_checkpoint(s).info(n)) for s in plan.sources if _checkpoint(s) is not None
                for n in s.task_specific)
    support = sum(f.source.stat().st_size for f in plan.files if f.source is not None and f.source.is_file())
    if fmt == "lora":
        rank = plan.recipe.output.lora_rank
        return heads + sum(4 * rank * sum(e.shape) if e.kind == "matrix" else e.nbytes for e in entries)
    header = sum(len(e.name) + 64 for e in entries)  # safetensors JSON header: name, dtype, shape, offsets
    total = sum(e.nbytes for e in entries) + header + heads + support
    if plan.recipe.spec.per_task:
        mergeable = plan.mergeable()
        total += sum(e.nbytes for e in mergeable) + len(plan.sources) * sum(math.prod(e.shape) // 8 for e in mergeable)
    return total


def free_disk(out: Path) -> tuple[int, Path]:
    """Free bytes of the file system ``out`` will be written to, and the folder measured."""
    folder = Path(out).expanduser().resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free, folder


def peak_memory(plan: Plan, in_memory: bool) -> tuple[int, int]:
    """(host bytes, device working-set bytes) at the peak."""
    mergeable = plan.mergeable()
    work = max((working_set(plan, e) for e in mergeable), default=0)
    buffered = sum(e.nbytes for e in plan.entries) if in_memory else max((u.nbytes for u in plan.units), default=0)
    return baseline_memory() + work + buffered, work


# ----------------------------------------------------------------------------------- timing


def cost(plan: Plan, entry: PlanEntry) -> float:
    """The calibration's cost model: elements, times √min(m, n) per matrix for an SVD method's
    matrices (truncated and randomized SVDs grow slower than the full SVD's m·n·min(m, n))."""
    numel = math.prod(entry.shape)
    if plan.recipe.spec.family != "svd" or entry.kind == "fallback":
        return float(numel)
    m, n = entry.view[1:] if entry.view is not None else entry.shape
    return float(numel) * math.sqrt(min(m, n))


def calibration_entries(plan: Plan) -> list[PlanEntry]:
    """The smallest and the median-cost tensor of each kind (at most :data:`CALIBRATION_LIMIT` elements)."""
    chosen: list[PlanEntry] = []
    for kind in TREATMENTS[:-1]:
        group = sorted((e for e in plan.mergeable() if e.kind == kind), key=lambda e: cost(plan, e))
        small = [e for e in group if math.prod(e.shape) <= CALIBRATION_LIMIT] or group[:1]
        chosen += list(dict.fromkeys(small[:1] + small[len(small) // 2:][:1]))
    return chosen


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(a, b) of time ≈ a + b·cost through the smallest and largest calibration points."""
    (c1, t1), (c2, t2) = points[0], points[-1]
    if c2 <= c1:
        return 0.0, t2 / max(c2, 1.0)
    b = max((t2 - t1) / (c2 - c1), 0.0)
    return max(t1 - b * c1, 0.0), b


def calibrate(plan: Plan, device: torch.device) -> tuple[float, str]:
    """Estimated seconds of the whole merge, and how it was calibrated (see the module docstring)."""
    chosen = calibration_entries(plan)
    if not chosen:
        return 0.0, "nothing to merge"
    sub = dataclasses.replace(plan, entries=tuple(chosen), units=(WorkUnit(0, tuple(chosen)),))
    start = time.perf_counter()
    with ThreadIndependent():
        prepass = run_prepass(sub, device)
        prepass_seconds = time.perf_counter() - start
        points: dict[str, list[tuple[float, float]]] = {}
        for entry in chosen:
            tick = time.perf_counter()
            merge_tensor(sub, entry, device, prepass)
            points.setdefault(entry.kind, []).append((cost(plan, entry), time.perf_counter() - tick))
    spent = time.perf_counter() - start
    total = 0.0
    for kind, kind_points in points.items():
        a, b = _fit(sorted(kind_points))
        total += sum(a + b * cost(plan, e) for e in plan.mergeable() if e.kind == kind)
    ratio = sum(cost(plan, e) for e in plan.mergeable()) / max(sum(cost(plan, e) for e in chosen), 1.0)
    total += prepass_seconds * ratio
    return total, f"calibrated on {len(chosen)} tensors in {spent:.1f} s"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


# ----------------------------------------------------------------------------------- report


@dataclass
class Preflight:
    """What ``primerge plan`` prints: inputs, treatments, differences, and the resource estimates
    (bytes; ``None`` where unknown) with ``problems`` that refuse the merge."""

    method: str
    inputs: list[str]
    counts: dict[str, int]
    differences: list[str]
    memory: int
    memory_available: int | None
    memory_where: str
    output: int | None
    disk_free: int | None
    disk_where: Path | None
    seconds: float | None = None
    calibration: str = ""
    problems: list[str] = field(default_factory=list)
    parameters: list[str] = field(default_factory=list)  # resolved per tensor class and blocks, where they vary
    translation: list[str] = field(default_factory=list)  # a translated recipe's origin and semantic differences
    architecture: list[str] = field(default_factory=list)  # an assembled output's (primerge.core.assembly)

    def to_text(self) -> str:
        lines = [f"primerge plan: {self.method}", "", "Inputs", *(f"  {line}" for line in self.inputs), ""]
        if self.architecture:
            lines += ["Output (assembled from the inputs' tensors)", *(f"  {line}" for line in self.architecture), ""]
        lines += ["Tensors by treatment (each tensor of the output once)"]
        lines += self._treatment_rows()
        lines += ["", "Differences from the base (how they are merged)"]
        lines += [f"  {d}" for d in self.differences] or ["  none: every model has the base's names, shapes and vocabulary"]
        if self.translation:
            lines += ["", self.translation[0], *(f"  {t}" for t in self.translation[1:])]
        if self.parameters:
            lines += ["", "Parameters per tensor (class, blocks: values; per model in model order)"]
            lines += [f"  {row}" for row in self.parameters]
        lines += ["", "Resources", self._resource("peak memory", self.memory, self.memory_available, self.memory_where)]
        if self.output is not None:
            lines.append(self._resource("output size", self.output, self.disk_free, f"free at {self.disk_where}"))
        if self.seconds is not None:
            lines.append(f"  {'time':<12} ~ {duration(self.seconds):<10} ({self.calibration})")
        lines += [""] + ([f"REFUSED: {p}" for p in self.problems] or ["OK: the merge fits."])
        return "\n".join(lines)

    def _treatment_rows(self) -> list[str]:
        """One row per treatment of :data:`~primerge.core.sources.TREATMENTS` (a partition of the output's tensors) and their
        total, then the counts that are not part of that partition: the vocabulary-aligned tensors
        (already counted above) and the models' task-specific tensors (not in the output's merge)."""
        def row(key: str, count: int, note: str = "") -> str:
            return f"  {ROW_LABELS[key]:<42} {count:>6}" + (f"  ({note})" if note else "")

        matrices = self.counts.get("expert_matrices", 0)
        rows = [row(k, self.counts.get(k, 0), f"{matrices} matrices" if k == "experts" and matrices else "")
                for k in TREATMENTS]
        rows += [row("total", sum(self.counts.get(k, 0) for k in TREATMENTS)), "Counted apart",
                 row("vocab_aligned", self.counts.get("vocab_aligned", 0), "among the tensors above"),
                 row("task_specific", self.counts.get("task_specific", 0), "the models' own, outside the merge")]
        return rows

    @staticmethod
    def _resource(what: str, need: int, have: int | None, where: str) -> str:
        verdict = "" if have is None else ("  ok" if need <= have else "  TOO BIG")
        have_text = "unknown" if have is None else size(have)
        return f"  {what:<12} ~ {size(need):<10} ({have_text} {where}){verdict}"


def preflight(plan: Plan, out: Path | None, device: torch.device, *, max_memory: int | None = None,
              calibrate_time: bool = True) -> Preflight:
    """The report of ``plan`` written to ``out`` (``None``: in memory) merging on ``device``."""
    host, work = peak_memory(plan, in_memory=out is None)
    if device.type == "cuda":
        free, where = torch.cuda.mem_get_info(device)[0], f"free on {device}"
        need = work
    else:
        free, where, need = available_memory(), "available", host
    if max_memory is not None:
        free, where = max_memory, "allowed (--max-memory)"
    disk, disk_where = free_disk(out) if out is not None else (None, None)
    report = Preflight(f"{plan.recipe.spec.name}, {len(plan.sources)} models, tokenizer: {plan.recipe.tokenizer}",
                       input_lines(plan), plan.counts(), list(plan.notes), need, free, where,
                       output_bytes(plan) if out is not None else None, disk, disk_where)
    report.problems += memory_problems(need, free, where) + disk_problems(report.output, disk, disk_where)
    report.parameters = plan.parameter_rows()
    report.architecture = plan.output_lines()
    if (origin := plan.recipe.origin) is not None:
        report.translation = [f"Translated from {origin.format} ({origin.file or 'a mapping'}): where primerge's "
                              f"semantics differ", *(origin.notes or ["nowhere"])]
    if calibrate_time and not report.problems:
        report.seconds, report.calibration = calibrate(plan, device)
    return report


def memory_problems(need: int, free: int | None, where: str) -> list[str]:
    """The refusal of a merge needing ``need`` bytes at its peak where ``free`` are (``where``)."""
    if free is None or need <= free:
        return []
    return [f"the merge needs ~{size(need)} of memory at its peak, {size(free)} {where}. Fix: fewer models at once, "
            f"a smaller --shard-size, --device cuda, or more memory (--max-memory raises the allowance)."]


def disk_problems(output: int | None, free: int | None, where: Path | None) -> list[str]:
    """The refusal of an output of ``output`` bytes where ``free`` are (at ``where``)."""
    if output is None or free is None or output <= free:
        return []
    return [f"the output needs ~{size(output)} on disk, {size(free)} free at {where}. Fix: write it elsewhere "
            f"(--out) or free space."]


def unit_memory(plan: Plan, unit: WorkUnit) -> int:
    """Bytes a worker holds for ``unit`` beyond its baseline: the largest working set among the
    unit's tensors (they merge one after the other) and the unit's stored bytes, which its writer
    buffers (a shard, or a tensor group's part of one)."""
    work = max((working_set(plan, e) for e in unit.entries if e.kind != "copy"), default=0)
    return work + unit.nbytes


def ray_problems(plan: Plan, units: Sequence[WorkUnit], nodes: list[tuple[str, int, int | None, int]],
                 max_memory: int | None) -> list[str]:
    """Why the ``units`` that run (the plan's shards split for the workers,
    :class:`~primerge.core.units.WorkerUnits`) would not fit on the Ray nodes: on a node (name,
    units at once k, available memory, a worker's resident bytes) any k units may run at the same
    time, so the node needs k worker baselines plus the sum of the k largest
    :func:`unit_memory` of all units (an upper bound that the k largest units reach when they meet
    there); ``max_memory`` replaces each node's available memory."""
    needs = sorted((unit_memory(plan, u) for u in units), reverse=True)
    problems = []
    for name, slots, available, worker in nodes:
        have, where = (max_memory, "allowed (--max-memory)") if max_memory is not None else (available, "available")
        at_once = max(slots, 1)
        need = at_once * max(worker, baseline_memory()) + sum(needs[:at_once])
        if have is not None and need > have:
            problems.append(f"on Ray node {name}, {at_once} units at once need ~{size(need)} of memory at their "
                            f"peak (the largest unit: {size(needs[0] if needs else 0)} beside a worker's "
                            f"baseline), {size(have)} {where} there. Fix: fewer --workers, more "
                            f"--cpus-per-worker, a smaller --shard-size, or more memory (--max-memory raises the "
                            f"allowance).")
    return problems


def check_fits(plan: Plan, out: Path | None, device: torch.device, max_memory: int | None = None,
               executor=None) -> None:
    """Refuse, with the numbers, a merge whose peak memory or output would not fit (no calibration).
    Under Ray (``executor`` a :class:`~primerge.engine.ray.RayExecutor`) this runs on the driver before
    any unit: the output's disk as for a local merge, the driver's memory when it collects an
    in-memory result, and every node's memory for the units that run there at once."""
    if plan.recipe.execution.backend != "ray":
        problems = preflight(plan, out, device, max_memory=max_memory, calibrate_time=False).problems
    else:
        problems = disk_problems(output_bytes(plan), *free_disk(out)) if out is not None else []
        if out is None:  # the driver collects every merged tensor
            allowed = (max_memory, "allowed (--max-memory)") if max_memory is not None else (available_memory(), "available")
            problems += memory_problems(baseline_memory() + sum(e.nbytes for e in plan.entries), *allowed)
        problems += ray_problems(plan, executor.work_units(plan), executor.node_memory(), max_memory)
    if problems:
        raise (InputError if "memory" in problems[0] else OutputError)(" ".join(problems))
