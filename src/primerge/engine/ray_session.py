"""A Ray session: one connection to Ray and its warm worker processes, held across merges.

Ray runs a driver's tasks in worker processes of the driver's *job* and reuses them for the job's
later tasks; a new driver is a new job, whose workers start afresh (Ray does not reuse workers
across jobs), each spending seconds importing torch and the engine. ``primerge merge --backend
ray`` is a new driver, so every such merge pays that start-up before its first unit
(docs/benchmarks.md, "Ray"). A process that merges many times holds one session instead:

    with primerge.ray_session(workers=4) as ray:   # connect; start 4 workers, each imports the engine
        for weights in grid:
            primerge.merge(..., execution=ray)      # every merge's units run in those 4 processes

- **Opening** (:meth:`RaySession.open`): join ``address`` within a deadline
  (:func:`~primerge.engine.ray_runtime.check_reachable`), or start a local runtime
  (:class:`~primerge.engine.ray_runtime.OwnedRuntime`), or, without an address in a process that
  already holds a Ray connection (the caller's own ``ray.init``), use that one. Then one warm-up
  task per worker imports the engine, and every one of them waits at a :class:`Gate` until all
  have arrived, so no two share a process: when ``open`` returns, ``warm_workers`` names
  ``workers`` processes with the engine imported (fewer only when the cluster has fewer free slots
  or they did not all start within :data:`WARM_DEADLINE`).
- **Merges** with ``backend: ray`` in this process run in the open session
  (:meth:`RaySession.current`; Ray holds one connection per process, and so one session), provided
  the execution settings they give are the session's (:meth:`RaySession.check`): a merge that
  asks for another address or worker shape is refused with one line.
- **Closing** leaves Ray as it was found: a runtime the session started is stopped, its processes
  and session folder removed (also when the process is killed: :mod:`~primerge.engine.ray_reaper`);
  a joined cluster keeps running; a connection the caller held stays open.

A merge outside any session opens a private one for itself (:class:`~primerge.engine.ray.RayExecutor`)
without waiting for the workers, whose start then overlaps the storage check, and closes it after.
Units on GPUs (``gpus_per_worker``) keep Ray's default for GPU tasks, a fresh worker per task,
which is what releases the GPU's memory; warm workers serve CPU units.

Nothing here imports torch: the :class:`Gate` actor's process stays light.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from primerge.engine.ray_runtime import OwnedRuntime, check_reachable
from primerge.util.errors import ExecutionError, InputError, RecipeError

if TYPE_CHECKING:
    from primerge.core.recipe import ExecutionConfig

#: Seconds the warm-up waits for every worker to start and import the engine.
WARM_DEADLINE = 120.0
#: How many times Ray reruns a task whose worker died (a primerge error is never retried).
RETRIES = 3
#: The settings a session fixes for the merges run in it.
SETTINGS = ("address", "workers", "cpus_per_worker", "gpus_per_worker")

_open: RaySession | None = None  # the session open in this process (Ray's connection is one per process)


def load_ray():
    """The ``ray`` module, or the one-line error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise RecipeError("backend ray needs Ray: pip install 'primerge[ray]'.") from None
    return ray


def worker_name() -> str:
    """Who runs a task: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Gate:
    """A Ray actor the warm-up tasks meet at: how many distinct workers have arrived."""

    def __init__(self) -> None:
        self.arrived: set[str] = set()

    def arrive(self, worker: str) -> int:
        self.arrived.add(worker)
        return len(self.arrived)


def _ready(gate: Any = None, count: int = 0, deadline: float = 0.0) -> str:
    """Task: import what every unit needs (torch, the engine, the methods); with a ``gate``, hold
    this worker until ``count`` workers have arrived there (or the epoch time ``deadline``)."""
    import primerge.engine.ray  # noqa: F401  the import is the warm-up

    me = worker_name()
    if gate is not None:
        ray = load_ray()
        while ray.get(gate.arrive.remote(me)) < count and time.time() < deadline:
            time.sleep(0.02)
    return me


def _node_name() -> str:
    """The node a task runs on: host, address and Ray's node id."""
    ray = load_ray()
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


class RaySession:
    """One process's connection to Ray and its warm workers (see the module docstring).

    ``config`` is an ``execution`` block with ``backend: ray``; after :meth:`connect`, ``workers``
    is the number of units run at once and ``warm_workers`` the processes the warm-up reached
    (``host:pid``, as ``units_per_worker`` in a merge's ``execution`` record names them).
    """

    def __init__(self, config: ExecutionConfig) -> None:
        self.config = config
        self.ray = load_ray()
        self.connected = False
        self.joined = False  # this session called ray.init (and disconnects at close)
        self.runtime: OwnedRuntime | None = None  # the local runtime this session started
        self.workers = 0
        self.warm_workers: tuple[str, ...] = ()
        self._tasks: dict[Any, Any] = {}

    # ------------------------------------------------------------------ the process's session

    @staticmethod
    def current() -> RaySession | None:
        """The session open in this process, if any."""
        return _open

    def open(self) -> RaySession:
        """Connect, start every worker and wait until each has imported the engine; from now on
        Ray merges in this process run here. One session at a time per process."""
        global _open
        if _open is not None:
            raise ExecutionError("a Ray session is already open in this process (Ray holds one connection per "
                                 "process); merge inside that one, or close it before opening another.")
        try:
            self.connect(wait=True)
        except BaseException:  # a runtime started before the failure (or Ctrl-C) is stopped with it
            self.close()
            raise
        _open = self
        return self

    def close(self) -> None:
        """Leave Ray as it was found: disconnect from a joined cluster; stop a runtime started here and
        remove its processes and session folder (:class:`~primerge.engine.ray_runtime.OwnedRuntime`);
        leave a connection the caller held open. Closing twice does nothing more."""
        global _open
        if _open is self:
            _open = None
        if self.joined:
            self.ray.shutdown()
            self.joined = False
        if self.runtime is not None:
            self.runtime.close()
            self.runtime = None
        self.connected = False
        self._tasks.clear()

    @classmethod
    def held_for(cls, config: ExecutionConfig) -> AbstractContextManager:
        """A session to hold around a run of many merges with ``config`` (``primerge tune``'s trials):
        a new one for ``backend: ray`` when none is open, else nothing (an open session stays in
        charge; a local merge needs none)."""
        if config.backend != "ray" or _open is not None:
            return nullcontext()
        return cls(config)

    def __enter__(self) -> RaySession:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self, config: ExecutionConfig) -> None:
        """Refuse a merge, run in this session, whose execution settings are not the session's
        (a setting the merge leaves unset is the session's)."""
        if not self.connected or not self.ray.is_initialized():
            raise ExecutionError("the Ray session is closed (or its Ray connection was shut down); open a new "
                                 "one with primerge.ray_session().")
        mine = {**{key: getattr(self.config, key) for key in SETTINGS}, "workers": self.workers}
        differ = [f"{key} {getattr(config, key)} (the session's: {mine[key]})"
                  for key in SETTINGS if key in config.model_fields_set and getattr(config, key) != mine[key]]
        if differ:
            raise RecipeError(f"this merge asks for Ray {', '.join(differ)}, but runs in the Ray session open in "
                              f"this process; leave these settings out of its execution block, or close the "
                              f"session to merge elsewhere.")

    # ------------------------------------------------------------------ connecting

    def connect(self, wait: bool) -> None:
        """Join ``config.address`` or start a local runtime (or use the process's own connection when
        no address is given), then start every worker; with ``wait``, return once each has imported
        the engine (:meth:`_warm`)."""
        if self.connected:
            return
        ray, address = self.ray, self.config.address
        if ray.is_initialized() and address:
            raise ExecutionError(f"this process is already connected to a Ray cluster; give no --address to use "
                                 f"it, or call ray.shutdown() before joining {address}.")
        if not ray.is_initialized():
            options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            try:
                if address:
                    check_reachable(address)  # within a deadline: ray.init would wait for minutes
                    ray.init(address=address, **options)
                    self.joined = True
                else:
                    self.runtime = OwnedRuntime(ray, options)
                    self.joined = True
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ExecutionError(f"cannot reach the Ray cluster at {address or 'a new local runtime'} "
                                     f"({str(exc)[:200]}); start it with `ray start --head` or check "
                                     f"--address.") from None
        self.connected = True
        self.workers = self._count_workers()
        self._warm(wait)

    def _count_workers(self) -> int:
        """Units run at once: ``config.workers``, else the cluster's CPUs (or GPUs) per unit's share."""
        if self.config.workers is not None:
            return self.config.workers
        return max(1, self._slots(self.ray.cluster_resources()))

    def _slots(self, resources: dict) -> int:
        """How many units ``resources`` (a node's or the cluster's) hold at once."""
        if self.config.gpus_per_worker > 0:
            return int(resources.get("GPU", 0) // self.config.gpus_per_worker)
        return int(resources.get("CPU", 0) // self.config.cpus_per_worker)

    def _warm(self, wait: bool) -> None:
        """Start every worker now, side by side: a new Ray job starts its worker processes on demand,
        and each spends seconds importing torch; without this the storage check's worker and then
        each unit worker would start one after the other. Without ``wait`` nothing waits for these
        tasks (a merge's own start overlaps them); with it, one task per free slot (up to
        ``workers``) holds its worker at a :class:`Gate` until all have arrived, so each lands in a
        process of its own."""
        ready = self.task(_ready)
        if not wait:
            for _ in range(self.workers):
                ready.remote()
            return
        ray = self.ray
        count = max(1, min(self.workers, self._slots(ray.available_resources())))
        gate = ray.remote(Gate).options(num_cpus=0).remote()
        try:
            deadline = time.time() + WARM_DEADLINE
            self.warm_workers = tuple(sorted(set(ray.get([ready.remote(gate, count, deadline)
                                                          for _ in range(count)]))))
        finally:
            ray.kill(gate)

    # ------------------------------------------------------------------ running tasks

    def options(self) -> dict:
        """Ray options of a unit's task: its CPUs and GPUs, retries when its worker dies, never when
        it raises (a primerge error is the run's answer)."""
        return {"num_cpus": self.config.cpus_per_worker, "num_gpus": self.config.gpus_per_worker,
                "max_retries": RETRIES, "retry_exceptions": False}

    def task(self, function) -> Any:
        """``function`` as a Ray task with :meth:`options`, made once per session."""
        if function not in self._tasks:
            self._tasks[function] = self.ray.remote(function).options(**self.options())
        return self._tasks[function]

    def on_every_node(self, function, *args) -> list[tuple[dict, Any]]:
        """``function(*args)`` as one task pinned to each alive node: (the node's record, the result).
        It reserves a unit worker's CPUs where the node has them, so that it runs in a worker
        :meth:`_warm` started instead of one more process importing torch beside them (measured: the
        first unit starts 1–3 s sooner on 2 cores); a node without CPUs gets it too."""
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
        there and a worker's resident bytes, measured by a task on the node."""
        return [(name, min(self.workers, self._slots(node.get("Resources", {}))), available, worker)
                for node, (name, available, worker) in self.on_every_node(_node_memory)]

    def check_storage(self, paths: list[str]) -> None:
        """One task per alive node: refuse the run if any node cannot see one of ``paths``."""
        for _, (node, missing) in self.on_every_node(_missing, paths):
            if missing:
                raise InputError(f"Ray node {node} cannot see {missing[0]} ({len(missing)} of {len(paths)} paths "
                                 f"missing there): every node must see the inputs and the output folder at "
                                 f"the same paths (a shared filesystem).")

    def where(self) -> str:
        """Where the session runs, in words: the address it joined, a local runtime, or the caller's."""
        if self.config.address:
            return self.config.address
        return "local runtime" if self.runtime is not None else "this process's Ray connection"

    def nodes(self) -> int:
        return sum(1 for node in self.ray.nodes() if node["Alive"]) if self.connected else 0
