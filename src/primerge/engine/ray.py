"""The units of a merge on a Ray cluster: ``execution: {backend: ray}`` / ``--backend ray``.

Ray (``pip install "primerge[ray]"``) schedules, retries and moves data; primerge only says what
runs: the same pure function of (plan, unit, pre-pass result) as a local merge.

- **Start or join.** Without ``address`` a local Ray runtime is started for the run (all CPUs and
  GPUs of the machine) and stopped after it, its processes and session folder removed even when the
  driver is killed; with ``address`` (``auto`` or ``HOST:PORT``) primerge joins an existing cluster
  (``ray start --head`` / ``ray start --address``), within a deadline and with a one-line error
  when nothing or something else answers there, and leaves it running
  (:mod:`primerge.engine.ray_runtime`).
- **Pre-flight.** Before any unit, one task per node measures the memory available there
  (:meth:`RayExecutor.node_memory`), and the driver refuses a run whose units would not fit on a
  node (:func:`primerge.engine.preflight.check_fits`), as a local merge is refused.
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
- **Faults**: a task whose worker dies is retried by Ray (up to :data:`RETRIES` times) and, being a
  pure function of its inputs, writes the same bytes; a primerge error inside a unit is raised by
  the driver as it is (exit 2), never retried; Ctrl-C cancels every running task before the
  temporary folder is removed.
"""

from __future__ import annotations

import os
import resource
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from primerge.util.deterministic import ThreadIndependent
from primerge.engine.ray_runtime import OwnedRuntime, check_reachable
from primerge.engine.stream import execute_unit, fold_units, prepass_statistics, progress
from primerge.util.errors import ExecutionError, InputError, PrimergeError, RecipeError
from primerge.util.platform import machine_kind, mixed_kinds_note
from primerge.output.base import UnitWriter
from primerge.core.plan import Plan, WorkUnit
from primerge.core.units import WorkerUnits
from primerge.core.recipe import ExecutionConfig

#: How many times Ray reruns a unit whose worker died (a primerge error is never retried).
RETRIES = 3


def _ray():
    try:
        import ray
    except ImportError:
        raise RecipeError("backend ray needs Ray: pip install 'primerge[ray]'.") from None
    return ray


def _worker() -> str:
    """Who ran a task: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _unit_statistics(plan: Plan, prepass: Any, pass_index: int, unit: WorkUnit, device: str) -> Any:
    """Task: one unit's pre-pass statistics (:func:`primerge.engine.stream.prepass_statistics`)."""
    with ThreadIndependent():
        return prepass_statistics(plan, prepass, pass_index, unit.entries, torch.device(device))


def _unit(plan: Plan, unit: WorkUnit, prepass: Any, writer: UnitWriter,
          device: str) -> tuple[Any, str, float, float, str]:
    """Task: merge ``unit`` and hand its tensors to the output's unit writer, here; returns the
    receipt, the worker, the seconds it took, the worker's peak RSS (MiB) and its machine kind."""
    start = time.perf_counter()
    with ThreadIndependent():
        receipt = writer.write(unit, execute_unit(plan, unit, torch.device(device), prepass))
    return receipt, _worker(), time.perf_counter() - start, _peak_rss_mib(), machine_kind(device)


def _ready() -> str:
    """Task: nothing but starting a worker and importing this module (torch and the engine)."""
    return _worker()


def _node_name() -> str:
    """The node a task runs on: host, address and Ray's node id."""
    ray = _ray()
    node_id = ray.get_runtime_context().get_node_id()[:8]
    return f"{socket.gethostname()} ({ray.util.get_node_ip_address()}, id {node_id})"


def _missing(paths: list[str]) -> tuple[str, list[str]]:
    """Task pinned to one node: the node's name and the paths it cannot see."""
    return _node_name(), [p for p in paths if not os.path.exists(p)]


def _node_memory() -> tuple[str, int | None, int]:
    """Task pinned to one node: its name, the memory available there, and this worker's resident
    bytes (a worker's baseline: Python, torch and the engine imported)."""
    from primerge.engine.preflight import available_memory, baseline_memory

    return _node_name(), available_memory(), baseline_memory()


def plan_paths(plan: Plan) -> list[str]:
    """Every file the merge reads: the base's weights and support files and each model's files."""
    files = {file for _, files in plan.input_files() for file in files}
    return sorted(str(Path(f).resolve()) for f in files)


class RayExecutor:
    """Runs pre-passes and units as Ray tasks (see the module docstring)."""

    def __init__(self, config: ExecutionConfig, device: str) -> None:
        self.config = config
        self.device = "cuda" if config.gpus_per_worker > 0 else device
        self.ray = _ray()
        self.started = False
        self.runtime: OwnedRuntime | None = None  # the local runtime this executor started
        self.stats: dict[str, list[float]] = {}  # worker -> seconds of each unit it merged
        self.peak_rss = 0.0  # the largest peak RSS (MiB) a worker reported
        self.kinds: Counter[str] = Counter()  # machine kind -> units merged on it

    # ------------------------------------------------------------------ cluster

    def connect(self) -> None:
        """Join ``config.address`` or start a local runtime; a runtime this process already holds
        (the caller's own ``ray.init``) is used as it is when no address is given."""
        ray = self.ray
        if self.started or (ray.is_initialized() and not self.config.address):
            return
        if ray.is_initialized():
            raise ExecutionError(f"this process is already connected to a Ray cluster; give no --address to use "
                                 f"it, or call ray.shutdown() before joining {self.config.address}.")
        options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        try:
            if self.config.address:
                check_reachable(self.config.address)  # within a deadline: ray.init would wait for minutes
                ray.init(address=self.config.address, **options)
            else:
                self.runtime = OwnedRuntime(ray, options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ExecutionError(f"cannot reach the Ray cluster at {self.config.address or 'a new local runtime'} "
                                 f"({str(exc)[:200]}); start it with `ray start --head` or check --address.") from None
        self.started = True
        self._start_workers()

    def _start_workers(self) -> None:
        """Start every worker now, side by side: a new Ray job starts its worker processes on demand,
        and each spends seconds importing torch; without this the storage check's worker and then
        each unit worker would start one after the other. Nothing waits for these tasks."""
        ready = self.ray.remote(_ready).options(**self._options())
        for _ in range(self.workers()):
            ready.remote()

    def close(self) -> None:
        """Leave Ray as it was found: disconnect from a joined cluster; stop a runtime started here and
        remove its processes and session folder (:class:`~primerge.engine.ray_runtime.OwnedRuntime`)."""
        if self.started:
            self.ray.shutdown()
            self.started = False
        if self.runtime is not None:
            self.runtime.close()
            self.runtime = None

    def workers(self) -> int:
        """Units run at once: ``config.workers``, else the cluster's CPUs (or GPUs) per unit's share."""
        if self.config.workers is not None:
            return self.config.workers
        resources = self.ray.cluster_resources()
        if self.config.gpus_per_worker > 0:
            return max(1, int(resources.get("GPU", 0) // self.config.gpus_per_worker))
        return max(1, int(resources.get("CPU", 1) // self.config.cpus_per_worker))

    def work_units(self, plan: Plan) -> tuple[WorkUnit, ...]:
        """The plan's shards split into tensor groups sized for the workers
        (:class:`~primerge.core.units.WorkerUnits`), so that every worker gets work whatever the
        model's size; the output joins a split shard's groups back into the shard."""
        return WorkerUnits(self.workers()).split(plan.units)

    def _on_every_node(self, function, *args) -> list[tuple[dict, Any]]:
        """``function(*args)`` as one task pinned to each alive node: (the node's record, the result).
        It reserves a unit worker's CPUs where the node has them, so that it runs in a worker
        :meth:`_start_workers` started instead of one more process importing torch beside them
        (measured: the first unit starts 1–3 s sooner on 2 cores); a node without CPUs gets it too."""
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(function)
        nodes = [node for node in ray.nodes() if node["Alive"]]
        refs = [task.options(num_cpus=min(self.config.cpus_per_worker, node.get("Resources", {}).get("CPU", 0)),
                             scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                .remote(*args) for node in nodes]
        return list(zip(nodes, ray.get(refs)))

    def node_memory(self) -> list[tuple[str, int, int | None, int]]:
        """Per alive node: its name, how many units run there at once (``workers``, at most what its
        CPUs or GPUs hold at ``cpus_per_worker`` / ``gpus_per_worker`` each), the memory available
        there and a worker's resident bytes, measured by a task on the node (pre-flight, before any unit)."""
        self.connect()
        found = []
        for node, (name, available, worker) in self._on_every_node(_node_memory):
            resources = node.get("Resources", {})
            if self.config.gpus_per_worker > 0:
                slots = int(resources.get("GPU", 0) // self.config.gpus_per_worker)
            else:
                slots = int(resources.get("CPU", 0) // self.config.cpus_per_worker)
            found.append((name, min(self.workers(), slots), available, worker))
        return found

    def check_storage(self, paths: list[str]) -> None:
        """One task per alive node: refuse the run if any node cannot see one of ``paths``."""
        for _, (node, missing) in self._on_every_node(_missing, paths):
            if missing:
                raise InputError(f"Ray node {node} cannot see {missing[0]} ({len(missing)} of {len(paths)} paths "
                                 f"missing there): every node must see the inputs and the output folder at "
                                 f"the same paths (a shared filesystem).")

    def _options(self) -> dict:
        return {"num_cpus": self.config.cpus_per_worker, "num_gpus": self.config.gpus_per_worker,
                "max_retries": RETRIES, "retry_exceptions": False}

    # ------------------------------------------------------------------ the Executor protocol

    def prepass(self, plan: Plan, quiet: bool) -> Any:
        self.connect()
        self.check_storage(plan_paths(plan))
        prepass = plan.recipe.spec.make_prepass(plan.method_params)
        if prepass is None:
            return None
        task = self.ray.remote(_unit_statistics).options(**self._options())
        plan_ref = self.ray.put(plan)
        for i in range(prepass.passes):
            refs = [task.remote(plan_ref, prepass, i, unit, self.device) for unit in self.work_units(plan)]
            prepass.end_pass(i, fold_units(prepass, self._results(refs)))
        return prepass.result()

    def units(self, plan: Plan, prepass: Any, writer: UnitWriter, quiet: bool) -> Iterator[tuple[WorkUnit, Any]]:
        self.connect()
        folder = getattr(writer, "folder", None)
        if folder is not None:
            self.check_storage([str(Path(folder).resolve())])
        task = self.ray.remote(_unit).options(**self._options())
        plan_ref, prepass_ref = self.ray.put(plan), self.ray.put(prepass)
        window, pending = 2 * self.workers(), deque()
        units = self.work_units(plan)
        todo = iter(units)
        try:
            with progress(plan, quiet) as bar:
                for unit in units:
                    while len(pending) < window and (nxt := next(todo, None)) is not None:
                        pending.append(task.remote(plan_ref, nxt, prepass_ref, writer, self.device))
                    receipt, worker, seconds, rss, kind = self._result(pending.popleft())
                    self.stats.setdefault(worker, []).append(seconds)
                    self.kinds[kind] += 1
                    self.peak_rss = max(self.peak_rss, rss)
                    bar.update(unit.nbytes)
                    bar.set_postfix_str(self._throughput(), refresh=False)
                    yield unit, receipt
        finally:
            for ref in pending:
                self.ray.cancel(ref, force=True)
        if note := mixed_kinds_note(self.kinds):
            print(f"primerge: warning: {note}", file=sys.stderr)

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
        nodes = sum(1 for node in self.ray.nodes() if node["Alive"]) if self.ray.is_initialized() else 0
        return {"backend": "ray", "address": self.config.address or "local runtime", "nodes": nodes,
                "workers": self.workers() if self.ray.is_initialized() else self.config.workers,
                "gpus_per_worker": self.config.gpus_per_worker, "device": self.device,
                "units_per_worker": {w: len(s) for w, s in sorted(self.stats.items())},
                "units_per_second": {w: round(len(s) / sum(s), 3) for w, s in sorted(self.stats.items()) if sum(s) > 0},
                "worker_peak_rss_mib": round(self.peak_rss),
                "machine_kinds": dict(sorted(self.kinds.items()))}

