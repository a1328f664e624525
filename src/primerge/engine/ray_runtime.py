"""Joining a Ray cluster within a deadline, and the local Ray runtime primerge starts and removes.

**Joining** (``--address HOST:PORT`` or ``auto``): ``ray.init`` waits for a cluster's GCS for many
minutes when nothing answers at the address, so the address is probed first
(:func:`check_reachable`), within :data:`CONNECT_DEADLINE` seconds: a TCP connection, then the
HTTP/2 client preface every gRPC server (the GCS is one) answers with a SETTINGS frame. Refused
connections, silence, an HTTP/1 server or anything else that answers is one
:class:`~primerge.util.errors.ExecutionError` naming the address, where it came from (``auto``
reads ``RAY_ADDRESS`` or the ``ray_current_cluster`` file an earlier ``ray start`` left in Ray's
temporary folder, which outlives its cluster) and what answered.

**A runtime of its own** (no address): :class:`OwnedRuntime` starts it with ``ray.init`` while the
environment variable :data:`~primerge.engine.ray_reaper.VARIABLE` holds a fresh token, and starts
:mod:`~primerge.engine.ray_reaper` beside it, which stops every process carrying the token and
removes the runtime's session folder once the driver closes its pipe, or dies.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from primerge.engine import ray_reaper
from primerge.util.errors import ExecutionError

#: Seconds a connection to a cluster's address may take to be made and answered.
CONNECT_DEADLINE = 15.0
#: The HTTP/2 connection preface and an empty SETTINGS frame (RFC 9113, sections 3.4 and 6.5).
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_SETTINGS = 0x04


def _address_file() -> Path | None:
    """Where ``ray start`` records the address of the cluster it started (Ray's temporary folder)."""
    try:
        from ray._common.utils import get_ray_address_file
    except ImportError:  # another Ray version's layout
        return None
    return Path(get_ray_address_file(None))


def gcs_address(address: str) -> tuple[str, int, str]:
    """(host, port) of the GCS that ``ray.init(address)`` would join, and where it came from, in words."""
    from ray._private.services import canonicalize_bootstrap_address

    source = ""
    if address == "auto":
        record = _address_file()
        if os.environ.get("RAY_ADDRESS"):
            source = " (from RAY_ADDRESS)"
        elif record is not None and record.is_file():
            source = (f" (recorded in {record} by an earlier `ray start`; that file outlives its cluster: remove "
                      f"it if the cluster is gone)")
    try:
        resolved = canonicalize_bootstrap_address(address)
    except Exception as exc:  # ConnectionError (no cluster found), ValueError (a malformed address), ...
        raise ExecutionError(f"--address {address}: {str(exc).splitlines()[0][:200]} Start a cluster with "
                             f"`ray start --head`, or give --address HOST:PORT.") from None
    host, _, port = (resolved or "").rpartition(":")
    if not host or not port.isdigit():
        raise ExecutionError(f"--address {address}: not HOST:PORT or auto ({resolved!r:.80}).")
    return host.strip("[]"), int(port), source


def probe(host: str, port: int, deadline: float | None = None) -> str | None:
    """``None`` when a gRPC server answers at ``host:port`` within ``deadline`` seconds (default
    :data:`CONNECT_DEADLINE`), else what happened there, in words."""
    deadline = CONNECT_DEADLINE if deadline is None else deadline
    try:
        with socket.create_connection((host, port), timeout=deadline) as connection:
            connection.settimeout(deadline)
            connection.sendall(_H2_PREFACE)
            answer = connection.recv(64)
    except ConnectionRefusedError:
        return "nothing listens there (connection refused)"
    except socket.timeout:
        return f"no answer within {deadline:g} s"
    except OSError as exc:
        return f"cannot connect ({exc.strerror or exc})"
    if len(answer) >= 9 and answer[3] == _SETTINGS:
        return None
    if answer.startswith(b"HTTP/") or answer.lstrip()[:9].lower() in (b"<!doctype", b"<html>\n", b"<html><he"):
        first = answer.strip().splitlines()[0].decode("latin-1")[:40]
        return f"an HTTP server answered ({first}...), not a Ray cluster"
    if not answer:
        return "the connection was closed without an answer: not a Ray cluster"
    return f"something that is not a Ray cluster answered ({answer[:16]!r})"


def check_reachable(address: str) -> None:
    """Refuse, within :data:`CONNECT_DEADLINE` seconds, an ``--address`` where no Ray cluster answers."""
    host, port, source = gcs_address(address)
    problem = probe(host, port)
    if problem is not None:
        raise ExecutionError(f"cannot join the Ray cluster at {host}:{port} (--address {address}){source}: "
                             f"{problem}. Start one with `ray start --head`, or give the address of a running "
                             f"cluster.")


def _session_folder(ray: Any) -> str | None:
    """The session folder of the runtime this process started (``None`` where Ray hides it)."""
    try:
        return ray._private.worker._global_node.get_session_dir_path()
    except AttributeError:
        return None


class OwnedRuntime:
    """A local Ray runtime started for one run, its processes and session folder removed with it
    (see the module docstring)."""

    def __init__(self, ray: Any, options: dict) -> None:
        token = uuid.uuid4().hex
        environment = {k: v for k, v in os.environ.items() if k != ray_reaper.VARIABLE}
        self.reaper = subprocess.Popen([sys.executable, ray_reaper.__file__, token, str(os.getpid())],
                                       stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       start_new_session=True, env=environment, text=True)
        previous = os.environ.get(ray_reaper.VARIABLE)
        os.environ[ray_reaper.VARIABLE] = token
        try:
            ray.init(address="local", **options)  # never a cluster a `ray start` left recorded
        except BaseException:
            self.close()
            raise
        finally:
            if previous is None:
                os.environ.pop(ray_reaper.VARIABLE, None)
            else:
                os.environ[ray_reaper.VARIABLE] = previous
        self.reaper.stdin.write(f"{_session_folder(ray) or ''}\n")
        self.reaper.stdin.flush()

    def close(self) -> None:
        """Let the reaper stop what is left of the runtime (after ``ray.shutdown()``) and remove its
        session folder; waits for it."""
        if self.reaper.stdin and not self.reaper.stdin.closed:
            self.reaper.stdin.close()
        try:
            self.reaper.wait(timeout=4 * ray_reaper.GRACE)
        except subprocess.TimeoutExpired:
            pass  # it goes on in its own session; nothing waits for it
