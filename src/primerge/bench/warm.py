"""The warm Ray rows of ``primerge bench``: merges in one driver that holds a Ray session.

A cold Ray row is a fresh driver per merge (:func:`primerge.bench.runs.measure_merge`): what
``primerge merge --backend ray`` costs, Ray's start-up included. A warm row is a merge in a driver
that already holds a session whose workers have started and imported the engine
(:func:`primerge.ray_session`), as a Python user or a tuner merging many times pays it.
:class:`WarmDriver` starts that driver once, as a child process (``python -m primerge.bench
--warm ADDRESS WORKERS GPUS_PER_WORKER``, :func:`serve`), and sends it one merge at a time on its
stdin, interleaved with the other rows. For each merge the child prints the lines of a cold child
(:func:`~primerge.bench.runs.report_merge`: start-up counted from the request), its own wall and
CPU seconds for the merge, its peak RSS during it (``VmHWM``, reset before each merge through
``/proc/self/clear_refs``) and how many units ran in the processes the session warmed.
"""

from __future__ import annotations

import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from primerge.bench.runs import Measurement, merge_failed, parse_measurement, report_merge
from primerge.util.errors import PrimergeError

#: What the child prints once its session is open, and after each merge.
READY, DONE = "warm driver ready", "warm merge done"
TIMES_LINE = re.compile(r"warm merge: wall ([0-9.]+)s cpu ([0-9.]+)s")
REUSE_LINE = re.compile(r"units in warm workers: (\d+) of (\d+)")
OPEN_LINE = re.compile(r"session open in ([0-9.]+)s, (\d+) warm workers")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _reset_peak() -> None:
    """Reset this process's ``VmHWM`` to its current RSS (Linux ``clear_refs``; elsewhere nothing)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the peak then covers every merge so far
        pass


def serve(argv: list[str]) -> int:
    """``ADDRESS WORKERS GPUS_PER_WORKER``: open a Ray session there, then merge every request
    ``RECIPE<TAB>OUT<TAB>DEVICE<TAB>SHARD_SIZE`` read from stdin until it closes (module docstring)."""
    from primerge.api import ray_session

    address, workers, gpus = argv
    start = time.perf_counter()
    try:
        session = ray_session(address, workers=int(workers), gpus_per_worker=float(gpus)).open()
    except PrimergeError as exc:
        print(f"primerge: error: {exc}", flush=True)
        return 2
    try:
        print(f"session open in {time.perf_counter() - start:.3f}s, {len(session.warm_workers)} warm workers")
        print(READY, flush=True)
        for line in sys.stdin:
            recipe, out, device, shard = line.rstrip("\n").split("\t")
            _reset_peak()
            cpu, tick = _cpu_seconds(), time.perf_counter()
            try:
                result = report_merge(recipe, out, device, shard or None)
            except PrimergeError as exc:
                print(f"primerge: error: {exc}", flush=True)
                return 2
            print(f"warm merge: wall {time.perf_counter() - tick:.6f}s cpu {_cpu_seconds() - cpu:.6f}s")
            units = result.execution.get("units_per_worker", {})
            print(f"units in warm workers: {sum(n for w, n in units.items() if w in session.warm_workers)} of "
                  f"{sum(units.values())}", flush=True)
            print(DONE, flush=True)
    finally:
        session.close()
    return 0


class WarmDriver:
    """The parent's side: start the warm driver at ``address`` with ``workers`` (and
    ``gpus_per_worker``) and wait until its session is open; :meth:`measure` one merge in it."""

    def __init__(self, address: str, workers: int, gpus_per_worker: float = 0.0) -> None:
        start = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "primerge.bench", "--warm", address, str(workers),
                                      f"{gpus_per_worker:g}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        text = self._until(READY, "opening the Ray session")
        found = OPEN_LINE.findall(text)
        self.opened_s, self.warm_workers = (float(found[-1][0]), int(found[-1][1])) if found else (float("nan"), 0)
        self.started_s = time.perf_counter() - start  # the driver's own start-up (Python, torch) included
        self.reuse: dict[Path, list[int]] = {}  # recipe -> [units run in warm workers, units], over its merges

    def measure(self, recipe: Path, out: Path, device: str, shard_size: str | None = None) -> Measurement:
        """One merge in the warm driver, measured there (module docstring)."""
        launched = time.time()
        self.proc.stdin.write(f"{recipe}\t{out}\t{device}\t{shard_size or ''}\n")
        self.proc.stdin.flush()
        text = self._until(DONE, f"the merge of {recipe}")
        (wall, cpu), = TIMES_LINE.findall(text)[-1:]
        for warm, total in REUSE_LINE.findall(text)[-1:]:
            counts = self.reuse.setdefault(recipe, [0, 0])
            counts[0], counts[1] = counts[0] + int(warm), counts[1] + int(total)
        return parse_measurement(text, float(wall), float(cpu), float("nan"), launched)

    def reuse_note(self, recipe: Path) -> str:
        """How many of the units merged from ``recipe`` so far ran in the processes the session warmed."""
        reused, total = self.reuse.get(recipe, (0, 0))
        return f"{reused}/{total} units in warm workers"

    def _until(self, marker: str, what: str) -> str:
        """The child's lines up to ``marker``; the child's one-line error if it ends first."""
        lines = []
        for line in self.proc.stdout:
            if line.rstrip("\n") == marker:
                return "".join(lines)
            lines.append(line)
        raise merge_failed(f"the warm Ray driver ({what})", self.proc.wait(), "".join(lines))

    def close(self) -> None:
        """End the child (it closes its session, leaving the cluster as it found it) and wait for it."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self) -> WarmDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
