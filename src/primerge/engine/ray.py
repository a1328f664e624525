"""The units of a merge on a Ray cluster: ``execution: {backend: ray}`` / ``--backend ray``.

Ray (``pip install "primerge[ray]"``) schedules, retries and moves data; primerge only says what
runs: the same pure function of (plan, unit, pre-pass result) as a local merge.

- **Start or join.** The merge runs in the process's open :class:`~primerge.engine.ray_session.RaySession`
  (``primerge.ray_session()``: workers kept warm across merges), else in one of its own: without
  ``address`` a local Ray runtime is started for the run (all CPUs and GPUs of the machine) and
  stopped after it, its processes and session folder removed even when the driver is killed; with
  ``address`` (``auto`` or ``HOST:PORT``) primerge joins an existing cluster (``ray start --head`` /
  ``ray start --address``), within a deadline and with a one-line error when nothing or something
  else answers there, and leaves it running (:mod:`primerge.engine.ray_runtime`).
- **Pre-flight.** Before any unit, one task per node measures the memory available there
  (:meth:`~primerge.engine.ray_session.RaySession.node_memory`), and the driver refuses a run whose
  units would not fit on a node (:func:`primerge.engine.preflight.check_fits`), as a local merge
  is refused.
- **Shared storage.** Every node reads the inputs and writes into the output's temporary folder at
  the same paths: one machine's disk, or a shared filesystem on a cluster. Before any tensor is
  merged, one task per node checks that it sees every input file and the output folder; a node
  that does not fails the run with its address and the first missing path.
- **Units sized for the workers.** The plan's units are its output shards; with N workers each
  shard is split into groups of consecutive tensors of about 1/(4N) of the model
  (:class:`~primerge.core.units.WorkerUnits`), so N workers get work whatever the model's size
  and the shard size.
- **Pre-passes** (TIES model-wide trim, PRIME ``rank: auto``, EMR rescalers): one task per unit
  computes the unit's statistics; the driver folds them in unit order, exactly as a local merge
  (the statistics reduce exactly, so the split changes nothing).
- **Units**: one task per unit (``workers`` at a time, ``cpus_per_worker`` / ``gpus_per_worker``
  reserved each). The output's unit writer runs in the task — a model folder's shard file, or a
  group's part of it, is written there, straight into the temporary output folder — and the driver
  takes the receipts in unit order (joining a split shard's parts into the shard file, byte for
  byte what one writer writes), then writes the index, manifest and card, verifies and publishes as
  a local merge.
- **Faults**: a task whose worker dies is retried by Ray (up to
  :data:`~primerge.engine.ray_session.RETRIES` times) and, being a pure function of its inputs,
  writes the same bytes; a primerge error inside a unit is raised by
  the driver as it is (exit 2), never retried, once the units still running have finished (at
  most two per worker; they are not cancelled, as Ray's cancellation can race with a task's
  completion); Ctrl-C cancels every running task before the temporary folder is removed.
"""

from __future__ import annotations

import resource
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from primerge.util.deterministic import ThreadIndependent
from primerge.engine.ray_session import RETRIES, RaySession, load_ray, worker_name
from primerge.engine.stream import execute_unit, fold_units, prepass_statistics, progress
from primerge.util.errors import ExecutionError, PrimergeError
from primerge.util.platform import machine_kind, mixed_kinds_note
from primerge.output.base import UnitWriter
from primerge.core.plan import Plan, WorkUnit
from primerge.core.units import WorkerUnits
from primerge.core.recipe import ExecutionConfig


def _peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _unit_statistics(plan: Plan, prepass: Any, pass_index: int, unit: WorkUnit, device: str) -> Any:
    """Task: one unit's pre-pass statistics (:func:`primerge.engine.stream.prepass_statistics`)."""
    with ThreadIndependent():
        return prepass_statistics(plan, prepass, pass_index, unit.entries, torch.device(device))


def _unit(plan: Plan, unit: WorkUnit, prepass: Any, writer: UnitWriter,
          device: str) -> tuple[Any, str, float, float, str, float]:
    """Task: merge ``unit`` and hand its tensors to the output's unit writer, here; returns the
    receipt, the worker, the seconds it took, the worker's peak RSS (MiB), its machine kind and
    the epoch time it started (the worker's clock)."""
    started, start = time.time(), time.perf_counter()
    with ThreadIndependent():
        receipt = writer.write(unit, execute_unit(plan, unit, torch.device(device), prepass))
    return receipt, worker_name(), time.perf_counter() - start, _peak_rss_mib(), machine_kind(device), started


def plan_paths(plan: Plan) -> list[str]:
    """Every file the merge reads: the base's weights and support files and each model's files."""
    files = {file for _, files in plan.input_files() for file in files}
    return sorted(str(Path(f).resolve()) for f in files)


class RayExecutor:
    """Runs pre-passes and units as Ray tasks (see the module docstring)."""

    def __init__(self, config: ExecutionConfig, device: str) -> None:
        self.config = config
        self.device = "cuda" if config.gpus_per_worker > 0 else device
        self.ray = load_ray()
        self.session: RaySession | None = None
        self.owns_session = False  # a session opened for this merge alone, closed with it
        self.created = time.time()  # when the merge asked for Ray (the start-up is counted from here)
        self.first_unit: float | None = None  # epoch time the first unit started, on its worker's clock
        self.stats: dict[str, list[float]] = {}  # worker -> seconds of each unit it merged
        self.peak_rss = 0.0  # the largest peak RSS (MiB) a worker reported
        self.kinds: Counter[str] = Counter()  # machine kind -> units merged on it

    # ------------------------------------------------------------------ cluster

    def connect(self) -> RaySession:
        """The session the merge runs in: the one open in this process (its settings checked against
        ``config``), else one opened for this merge alone, whose workers start while the merge goes on."""
        if self.session is None:
            shared = RaySession.current()
            if shared is not None:
                shared.check(self.config)
                self.session = shared
            else:
                self.session, self.owns_session = RaySession(self.config), True
                self.session.connect(wait=False)
        return self.session

    def close(self) -> None:
        """Close a session opened for this merge alone (leaving Ray as it was found); an open
        session of the process stays open, its workers warm."""
        if self.owns_session and self.session is not None:
            self.session.close()
        self.session, self.owns_session = None, False

    def workers(self) -> int:
        """Units run at once (the session's ``workers``)."""
        return self.connect().workers

    def work_units(self, plan: Plan) -> tuple[WorkUnit, ...]:
        """The plan's shards split into tensor groups sized for the workers
        (:class:`~primerge.core.units.WorkerUnits`), so that every worker gets work whatever the
        model's size; the output joins a split shard's groups back into the shard."""
        return WorkerUnits(self.workers()).split(plan.units)

    def node_memory(self) -> list[tuple[str, int, int | None, int]]:
        """Per alive node: name, units at once, available memory, a worker's resident bytes
        (:meth:`~primerge.engine.ray_session.RaySession.node_memory`; pre-flight, before any unit)."""
        return self.connect().node_memory()

    # ------------------------------------------------------------------ the Executor protocol

    def prepass(self, plan: Plan, quiet: bool) -> Any:
        session = self.connect()
        session.check_storage(plan_paths(plan))
        prepass = plan.recipe.spec.make_prepass(plan.method_params)
        if prepass is None:
            return None
        task = session.task(_unit_statistics)
        plan_ref = self.ray.put(plan)
        for i in range(prepass.passes):
            refs = [task.remote(plan_ref, prepass, i, unit, self.device) for unit in self.work_units(plan)]
            prepass.end_pass(i, fold_units(prepass, self._results(refs)))
        return prepass.result()

    def units(self, plan: Plan, prepass: Any, writer: UnitWriter, quiet: bool) -> Iterator[tuple[WorkUnit, Any]]:
        session = self.connect()
        folder = getattr(writer, "folder", None)
        if folder is not None:
            session.check_storage([str(Path(folder).resolve())])
        task = session.task(_unit)
        plan_ref, prepass_ref = self.ray.put(plan), self.ray.put(prepass)
        window, pending = 2 * self.workers(), deque()
        units = self.work_units(plan)
        todo = iter(units)
        try:
            with progress(plan, quiet) as bar:
                for unit in units:
                    while len(pending) < window and (nxt := next(todo, None)) is not None:
                        pending.append(task.remote(plan_ref, nxt, prepass_ref, writer, self.device))
                    receipt, worker, seconds, rss, kind, started = self._result(pending.popleft())
                    self.stats.setdefault(worker, []).append(seconds)
                    self.kinds[kind] += 1
                    self.peak_rss = max(self.peak_rss, rss)
                    self.first_unit = min(started, self.first_unit or started)
                    bar.update(unit.nbytes)
                    bar.set_postfix_str(self._throughput(), refresh=False)
                    yield unit, receipt
        except KeyboardInterrupt:
            for ref in pending:
                self.ray.cancel(ref, force=True)
            raise
        except BaseException:
            self._drain(pending)
            raise
        if note := mixed_kinds_note(self.kinds):
            print(f"primerge: warning: {note}", file=sys.stderr)

    def _drain(self, pending: deque) -> None:
        """Wait for the units still running after a failed one (at most two per worker), so that
        none writes into the temporary folder once it is removed. They are not cancelled: Ray 2.60's
        cancellation races with a task's completion and can abort the driver ("Tried to complete task
        that was not pending", ray-project/ray#54846), which would turn a one-line error into a crash."""
        if pending:
            self.ray.wait(list(pending), num_returns=len(pending), fetch_local=False)

    def _throughput(self) -> str:
        return ", ".join(f"{w}: {len(s) / sum(s):.2f} units/s" for w, s in sorted(self.stats.items()) if sum(s) > 0)

    def _results(self, refs: list) -> Iterator[Any]:
        for ref in refs:
            yield self._result(ref)

    def _result(self, ref) -> Any:
        """A task's value; a primerge error raised in the task is raised here as it is."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, PrimergeError):
                raise exc.cause from None
            raise ExecutionError(f"a unit failed on the Ray cluster: {type(exc.cause).__name__}: {exc.cause}") from None
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
            raise ExecutionError(f"a unit's worker died {RETRIES + 1} times ({type(exc).__name__}); check the "
                                 f"nodes' memory and logs.") from None

    def describe(self) -> dict:
        """Where the merge ran and how the units spread; ``first_unit_after_s`` is the start-up: the
        seconds from the merge asking for Ray to its first unit starting on a worker."""
        session = self.session
        described = {
            "backend": "ray", "address": session.where() if session else self.config.address or "local runtime",
            "nodes": session.nodes() if session else 0, "workers": session.workers if session else self.config.workers,
            "gpus_per_worker": self.config.gpus_per_worker, "device": self.device,
            "units_per_worker": {w: len(s) for w, s in sorted(self.stats.items())},
            "units_per_second": {w: round(len(s) / sum(s), 3) for w, s in sorted(self.stats.items()) if sum(s) > 0},
            "worker_peak_rss_mib": round(self.peak_rss),
            "machine_kinds": dict(sorted(self.kinds.items()))}
        if self.first_unit is not None:
            described["first_unit_after_s"] = round(self.first_unit - self.created, 2)
        return described
