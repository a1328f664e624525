"""Benchmark runs: methods and their recipes, each merge measured in its own child process.

Every merge runs as ``python -m primerge.bench RECIPE OUT DEVICE`` (the same merge as ``primerge merge
--force --quiet``); its wall time and CPU time (user + system) come from ``os.wait4`` (the child's
own ``rusage``), its peak RSS and the engine's own merge time from its last output lines (the
child's ``VmHWM``: ``ru_maxrss`` would include the parent's size at fork). A Ray merge also
prints when its first unit started, so the start-up is measured from the moment the merge was
launched. The warm Ray rows' merges run instead in one driver holding a Ray session
(:mod:`primerge.bench.warm`), which prints the same lines.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from primerge.bench import RAY_WARM
from primerge.util.errors import ExecutionError, PrimergeError

if TYPE_CHECKING:
    from primerge.output.base import MergeResult


@dataclass(frozen=True)
class MethodRun:
    """A method and parameter overrides, written ``name`` or ``name:key=value;key=value``."""

    label: str
    method: str
    parameters: dict


def parse_method(text: str) -> MethodRun:
    text = text.strip()
    method, _, rest = text.partition(":")
    params: dict = {}
    for item in filter(None, (p.strip() for p in rest.split(";"))):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"method option '{item}' in '{text}' is not key=value")
        params[key.strip()] = yaml.safe_load(value.strip())
    return MethodRun(text, method.strip(), params)


def parse_methods(text: str) -> list[MethodRun]:
    """Split ``a,b:k=v;k2=v2,c`` into runs (commas separate methods)."""
    return [parse_method(t) for t in text.split(",") if t.strip()]


def write_recipe(path: Path, base: Path, models: Sequence[Path | dict], run: MethodRun,
                 extra: dict | None = None) -> Path:
    data = {**(extra or {}), "base": str(base), "models": [m if isinstance(m, dict) else str(m) for m in models],
            "method": run.method, "parameters": run.parameters}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass(frozen=True)
class Inputs:
    """What a benchmark merges: base, models and any extra recipe fields."""

    name: str
    base: Path
    models: tuple
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_zoo(cls, name: str, folder: Path, tasks: int) -> "Inputs":
        return cls(name, folder / "base", tuple(folder / f"ft-{t}" for t in range(tasks)))

    @classmethod
    def from_recipe(cls, path: Path) -> "Inputs":
        from primerge.core.recipe import load_recipe

        recipe = load_recipe(path)
        models = tuple({"path": str(m.path), "weight": m.weight, **({"name": m.name} if m.name else {})}
                       for m in recipe.models)
        extra = {k: v for k, v in (("matrices", recipe.matrices), ("task_specific", recipe.task_specific),
                                   ("seed", recipe.seed)) if v is not None}
        return cls(path.stem, recipe.base, models, extra)

    def subset(self, name: str, tasks: int) -> "Inputs":
        return Inputs(name, self.base, self.models[:tasks], self.extra)


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Measurement:
    """One merge in a child process: seconds, CPU seconds, peak RSS (MiB), engine seconds, on Ray
    the mean over workers of each worker's units per second of its own merging time, the units
    each worker merged (most first) and the start-up (seconds from launching the merge to its
    first unit starting on a worker), and the flops and seconds of its truncated SVDs
    (:class:`primerge.linalg.SVDOutcomes`, pre-pass included)."""

    wall_s: float
    cpu_s: float
    rss_mib: float
    merge_s: float
    unit_rate: float = float("nan")
    svd_flops: float = 0.0
    svd_s: float = 0.0
    worker_units: tuple[int, ...] = ()
    first_unit_s: float = float("nan")


MERGED_LINE = re.compile(r"merged with \S+ in ([0-9.]+)s")
SVD_LINE = re.compile(r"svd work: ([0-9.e+]+) flop in ([0-9.]+)s")
UNITS_LINE = re.compile(r"units/s per worker: ([0-9.e+ -]+)")
WORKER_UNITS_LINE = re.compile(r"units per worker: ([0-9 ]+)")
PEAK_LINE = re.compile(r"peak rss: (\d+) kB")
FIRST_UNIT_LINE = re.compile(r"first unit at: ([0-9.]+)")
ERROR_LINE = re.compile(r"^primerge: error: .*$", re.M)


#: The child command: this module's runner (``primerge merge`` with a precise time line).
RUNNER = [sys.executable, "-m", "primerge.bench"]


def child_merge(argv: Sequence[str]) -> int:
    """``RECIPE OUT DEVICE [SHARD_SIZE]``: the whole merge as ``primerge merge --force --quiet`` does
    it, then its lines (:func:`report_merge`); a primerge error is one line and exit code 2."""
    recipe, out, device, *shard = argv
    try:
        report_merge(recipe, out, device, shard[0] if shard else None)
    except PrimergeError as exc:
        print(f"primerge: error: {exc}", flush=True)
        return 2
    return 0


def report_merge(recipe: str, out: str, device: str, shard_size: str | None) -> MergeResult:
    """Merge ``recipe`` into ``out`` and print what the parent reads: on Ray the units/s and units
    of each worker and the epoch time its first unit started; the peak RSS, the SVD work, and last
    ``merged with METHOD in SECONDSs`` (the engine's time, to the microsecond)."""
    from primerge.api import merge_recipe

    called = time.time()
    size = {"shard_size": shard_size} if shard_size else {}
    result = merge_recipe(recipe, out=out, device=device, force=True, quiet=True, **size)
    execution = result.execution or {}
    rates = execution.get("units_per_second", {})
    if rates:
        print(f"units/s per worker: {' '.join(f'{rate:g}' for rate in rates.values())}")
        counts = list(execution["units_per_worker"].values())
        counts += [0] * (execution["workers"] - len(counts))  # workers that merged no unit
        print(f"units per worker: {' '.join(map(str, counts))}")
    if "first_unit_after_s" in execution:
        print(f"first unit at: {called + execution['first_unit_after_s']:.3f}")
    peak = own_peak_kib()
    if peak is not None:
        print(f"peak rss: {peak} kB")
    svds = result.svd + result.prepass_svd
    print(f"svd work: {svds.flops:.6g} flop in {sum(svds.seconds.values()):.6f}s")
    print(f"merged with {result.method} in {result.seconds:.6f}s", flush=True)
    return result


def own_peak_kib() -> int | None:
    """This process's own peak resident memory (Linux ``VmHWM``), or None where /proc has none.

    Not ``ru_maxrss``: Linux carries into it the RSS the process had between fork and exec, i.e. the
    parent's, so a child of a large benchmark process would report at least the parent's size."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, flags=re.M)
    return int(found.group(1)) if found else None


def measure_merge(recipe: Path, out: Path, device: str = "cpu", runner: Sequence[str] | None = None,
                  shard_size: str | None = None) -> Measurement:
    """Merge in a child process (``runner``, default :data:`RUNNER`, given RECIPE OUT DEVICE and
    ``shard_size`` when set); measure it with the child's own rusage from ``os.wait4``."""
    cmd = [*(runner or RUNNER), str(recipe), str(out), device, *([shard_size] if shard_size else [])]
    with tempfile.TemporaryFile() as log:
        launched, start = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read().decode(errors="replace")
    if proc.returncode != 0:
        raise merge_failed(f"the merge of {recipe}", proc.returncode, text)
    # Linux reports ru_maxrss in KiB, macOS in bytes: the fallback where the child printed no peak line
    rss = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    return parse_measurement(text, wall, usage.ru_utime + usage.ru_stime, rss, launched)


def merge_failed(what: str, code: int, text: str) -> ExecutionError:
    """One line for a child process (``what``) that failed: its own error line, else its last line."""
    found = ERROR_LINE.findall(text)
    last = found[-1] if found else next((ln for ln in reversed(text.splitlines()) if ln.strip()), "no output")
    return ExecutionError(f"bench: {what} failed (exit {code}): {last.strip()[:1000]}")


def parse_measurement(text: str, wall: float, cpu: float, rss_fallback: float, launched: float) -> Measurement:
    """A :class:`Measurement` from a child's lines (:func:`report_merge`): ``launched`` is the epoch
    time the merge was launched, from which the start-up to the first unit is counted; the peak RSS
    is the child's own line, else ``rss_fallback`` (MiB)."""
    found = MERGED_LINE.findall(text)
    merge_s = float(found[-1]) if found else float("nan")
    rates = [float(r) for line in UNITS_LINE.findall(text)[-1:] for r in line.split()]
    peak = PEAK_LINE.findall(text)
    rss = int(peak[-1]) / 1024 if peak else rss_fallback
    svd = [(float(f), float(t)) for f, t in SVD_LINE.findall(text)[-1:]] or [(0.0, 0.0)]
    units = tuple(sorted((int(n) for line in WORKER_UNITS_LINE.findall(text)[-1:] for n in line.split()), reverse=True))
    first = [float(t) - launched for t in FIRST_UNIT_LINE.findall(text)[-1:]]
    return Measurement(wall, cpu, rss, merge_s, statistics.fmean(rates) if rates else float("nan"), *svd[0], units,
                       first[0] if first else float("nan"))


@dataclass
class Row:
    """Medians of one configuration's runs and its ratios against the baseline."""

    group: str
    inputs: str
    label: str
    tasks: int
    runs: list[Measurement] = field(default_factory=list)
    note: str = ""
    paths: tuple[Path, ...] = ()  # the folders merged: the base, then the models

    def median(self, attr: str) -> float:
        return statistics.median(getattr(m, attr) for m in self.runs)

    def as_dict(self, baseline: "Row | None") -> dict:
        d = {"group": self.group, "inputs": self.inputs, "method": self.label, "T": self.tasks,
             "runs": len(self.runs)}
        for attr in ("wall_s", "cpu_s", "merge_s", "svd_s", "rss_mib"):
            d[attr] = round(self.median(attr), 3)
        for attr, key in (("wall_s", "wall_x"), ("merge_s", "merge_x"), ("rss_mib", "rss_x")):
            ref = baseline.median(attr) if baseline and baseline.runs else 0.0
            d[key] = round(self.median(attr) / ref, 3) if ref > 0 else ""
        rates = [m.unit_rate for m in self.runs if m.unit_rate == m.unit_rate]
        rate = f"units/s per worker {statistics.median(rates):.3g}" if rates else ""
        spread = [m.worker_units for m in self.runs if m.worker_units]
        units = f"units per worker {'/'.join(map(str, spread[-1]))}" if spread else ""
        starts = [m.first_unit_s for m in self.runs if m.first_unit_s == m.first_unit_s]
        start = f"first unit after {statistics.median(starts):.2f}s" if starts else ""
        d["note"] = "; ".join(filter(None, (self.note, start, rate, units)))
        return d


def run_interleaved(configs: Sequence[tuple[Row, Path]], repeats: int, workdir: Path, device: str,
                    log: Callable[[str], None] = print, runner: Sequence[str] | None = None,
                    shard_size: str | None = None, warm=None) -> None:
    """``repeats`` rounds, each merging every configuration once (interleaved); the warm Ray rows
    in ``warm`` (a :class:`primerge.bench.warm.WarmDriver`), every other in a child process of its own."""
    out = workdir / "merged"
    for rep in range(repeats):
        for row, recipe in configs:
            if row.group == RAY_WARM:
                m = warm.measure(recipe, out, device, shard_size)
                row.note = warm.reuse_note(recipe)
            else:
                m = measure_merge(recipe, out, device, runner, shard_size)
            row.runs.append(m)
            start = f"  first unit {m.first_unit_s:5.2f}s" if m.first_unit_s == m.first_unit_s else ""
            log(f"  [{rep + 1}/{repeats}] {row.inputs:<14} {row.group:<8} {row.label:<24} wall {m.wall_s:7.2f}s  "
                f"cpu {m.cpu_s:7.2f}s  merge {m.merge_s:7.2f}s  svd {m.svd_s:7.2f}s  rss {m.rss_mib:7.0f} MiB{start}")
    shutil.rmtree(out, ignore_errors=True)
