"""A private Ray cluster on this machine for benchmarks and tests: ``ray start --head`` (plus
optional extra nodes) on the loopback address, each a process group of its own, stopped by killing
exactly those groups. It runs without Ray's token authentication (loopback only, for the run)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Environment of the cluster's processes and of every driver that joins it.
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(args: list[str], prefix: list[str] | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``ray start ARGS --block`` on 127.0.0.1 (with ``env`` added to its environment), in a process
    group of its own; its output goes to an unnamed temporary file (``proc.log``) that
    :func:`wait_nodes` reads."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([*(prefix or []), RAY, "start", *args, "--node-ip-address", "127.0.0.1", "--block",
                             "--disable-usage-stats"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, **RAY_ENV, **(env or {})})
    proc.log = log
    return proc


def _started(node: subprocess.Popen) -> bool:
    """Whether ``ray start`` said the node is up; raises when it exited instead."""
    node.log.seek(0)
    text = node.log.read().decode(errors="replace")
    if node.poll() is not None:
        last = next((line for line in reversed(text.splitlines()) if line.strip()), "no output")
        options = node.args[node.args.index("start") + 1:][:2]
        raise RuntimeError(f"`ray start {' '.join(options)} ...` exited with code {node.returncode}: {last}")
    return "Ray runtime started" in text


def stop_node(proc: subprocess.Popen) -> None:
    """Stop one node's process group (SIGTERM, then SIGKILL)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:  # the group is already gone: nothing left to stop
        pass
    finally:
        proc.log.close()


def wait_nodes(address: str, count: int, timeout: float = 600, nodes: list[subprocess.Popen] = ()) -> None:
    """Poll the cluster from this process until ``count`` nodes are alive; a ``ray start`` of
    ``nodes`` that exits (a bad option) fails at once instead of after ``timeout``."""
    import ray

    deadline = time.time() + timeout
    while True:
        alive = 0
        if all([_started(node) for node in nodes]):  # ray.init on a node still starting blocks for a minute
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
                alive = sum(n["Alive"] for n in ray.nodes())
            except ConnectionError:  # not up yet: alive stays 0 and the loop polls again
                pass
            finally:
                ray.shutdown()
        if alive >= count:
            return
        if time.time() > deadline:
            raise TimeoutError(f"the Ray cluster at {address} did not reach {count} nodes in {timeout:.0f}s")
        time.sleep(1)


@contextmanager
def local_cluster(cpus_per_node: list[float], gpus: float = 0, idle_workers: int | None = None) -> Iterator[str]:
    """A head and ``len(cpus_per_node) - 1`` more nodes with these CPUs; yields ``127.0.0.1:PORT``.
    The environment of this process gets :data:`RAY_ENV` while the cluster runs. ``idle_workers``
    is how many worker processes a node keeps before it stops idle ones (Ray's
    ``num_workers_soft_limit``; default one per CPU)."""
    limit = {"RAY_num_workers_soft_limit": str(idle_workers)} if idle_workers is not None else {}
    previous = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    address = f"127.0.0.1:{free_port()}"
    port = address.rsplit(":", 1)[1]
    nodes = [start_node(["--head", "--port", port, "--num-cpus", f"{cpus_per_node[0]:g}", "--num-gpus", f"{gpus:g}",
                         "--include-dashboard=false"], env=limit)]  # :g, as `ray start` takes "0", not "0.0"
    try:
        wait_nodes(address, 1, nodes=nodes)
        for cpus in cpus_per_node[1:]:
            nodes.append(start_node(["--address", address, "--num-cpus", f"{cpus:g}", "--num-gpus", "0"], env=limit))
        wait_nodes(address, len(cpus_per_node), nodes=nodes)
        yield address
    finally:
        for node in reversed(nodes):
            stop_node(node)
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
