"""Ray never hangs, leaks nothing, and is held to pre-flight (issue 28, classes 3, 4 and 7).

Joining: an address where nothing listens, where an HTTP server or a silent one answers, or a stale
``ray_current_cluster`` file behind ``--address auto`` is one ExecutionError naming the address and
what answered, within the connect deadline. A runtime primerge starts: its session folder is removed
at the end, its processes (agents included) stop with the driver even when the driver is killed,
the manifest it writes is the local merge's, and ``--max-memory`` refuses it before any unit as it
refuses a local merge. Ray's temporary folder is a fresh one per test (``RAY_TMPDIR``), so other
Ray users on the machine are neither seen nor touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import primerge
from primerge.engine import ray_reaper, ray_runtime
from primerge.io.manifest import MANIFEST
from primerge.util.errors import ExecutionError, InputError

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

HEAD = r"^score\."


@pytest.fixture
def ray_tmp(monkeypatch):
    """A fresh, short Ray temporary folder (Unix socket paths must stay under 108 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield folder / "ray"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from golden.cases import build_zoo

    return build_zoo(tmp_path_factory.mktemp("ray_zoo") / "zoo")


def _models(zoo):
    return [zoo["t0"], zoo["t1"], zoo["t2"]]


def _join(zoo, tmp_path, address: str) -> str:
    started = time.monotonic()
    with pytest.raises(ExecutionError) as info:
        primerge.merge(zoo["base"], _models(zoo), "task_arithmetic", task_specific=HEAD, out=tmp_path / "out",
                       execution={"backend": "ray", "address": address})
    assert time.monotonic() - started < ray_runtime.CONNECT_DEADLINE + 60  # the deadline, and Ray's import
    assert not (tmp_path / "out").exists()
    message = str(info.value)
    assert "\n" not in message and len(message) < 1000
    return message


def test_an_address_where_nothing_listens(zoo, tmp_path, ray_tmp):
    message = _join(zoo, tmp_path, "127.0.0.1:1")
    assert ":1 (--address 127.0.0.1:1)" in message and "nothing listens there (connection refused)" in message


def test_an_address_where_an_http_server_answers(zoo, tmp_path, ray_tmp):
    server = ThreadingHTTPServer(("0.0.0.0", 0), SimpleHTTPRequestHandler)
    server.RequestHandlerClass.log_message = lambda *args: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        message = _join(zoo, tmp_path, f"127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    assert "an HTTP server answered" in message


def test_an_address_that_accepts_and_stays_silent(zoo, tmp_path, ray_tmp, monkeypatch):
    monkeypatch.setattr(ray_runtime, "CONNECT_DEADLINE", 2.0)
    silent = socket.create_server(("0.0.0.0", 0))
    try:
        message = _join(zoo, tmp_path, f"127.0.0.1:{silent.getsockname()[1]}")
    finally:
        silent.close()
    assert "no answer within 2 s" in message


def test_auto_with_a_stale_cluster_file(zoo, tmp_path, ray_tmp):
    """``ray start`` records its address in Ray's temporary folder; the file outlives the cluster."""
    with socket.create_server(("0.0.0.0", 0)) as gone:
        port = gone.getsockname()[1]
    ray_tmp.mkdir(parents=True)
    (ray_tmp / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    message = _join(zoo, tmp_path, "auto")
    assert "ray_current_cluster" in message and "connection refused" in message and f":{port}" in message


def _sessions(ray_tmp: Path) -> list[str]:
    return sorted(p.name for p in ray_tmp.glob("session_*")) if ray_tmp.exists() else []


def test_a_runtime_of_its_own_leaves_nothing_writes_the_local_manifest_and_keeps_to_preflight(zoo, tmp_path, ray_tmp):
    kw = dict(task_specific=HEAD, shard_size=3000)
    with pytest.raises(InputError, match="on Ray node .* units at once need"):
        primerge.merge(zoo["base"], _models(zoo), "ties", out=tmp_path / "refused", max_memory="1KB",
                       execution={"backend": "ray", "workers": 2}, **kw)
    assert not (tmp_path / "refused").exists() and _sessions(ray_tmp) == []
    local = primerge.merge(zoo["base"], _models(zoo), "ties", out=tmp_path / "local", **kw).out
    distributed = primerge.merge(zoo["base"], _models(zoo), "ties", out=tmp_path / "ray",
                                 execution={"backend": "ray", "workers": 2}, **kw).out
    assert (distributed / MANIFEST).read_bytes() == (local / MANIFEST).read_bytes()
    assert "backend ray" in (distributed / "README.md").read_text()  # the card may say where it ran
    assert _sessions(ray_tmp) == []


DRIVER = r"""
import sys, time
from primerge.core.recipe import ExecutionConfig
from primerge.engine.ray import RayExecutor
executor = RayExecutor(ExecutionConfig(backend="ray", workers=1), "cpu")
print(executor.connect().runtime.reaper.args[2], flush=True)
time.sleep(600)
"""


def test_the_runtime_stops_with_a_killed_driver(ray_tmp):
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env={**os.environ})
    token = driver.stdout.readline().strip()
    assert token and _sessions(ray_tmp), "the driver did not start its runtime"
    assert ray_reaper.marked_processes(token, set())  # the runtime's processes carry the token
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 30 + 4 * ray_reaper.GRACE
    while (ray_reaper.marked_processes(token, set()) or _sessions(ray_tmp)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_reaper.marked_processes(token, set()) == [] and _sessions(ray_tmp) == []


def test_the_reaper_touches_only_its_own_session(tmp_path):
    foreign = tmp_path / "not_a_session"
    foreign.mkdir()
    ray_reaper.remove_session(str(foreign))
    assert foreign.exists()
    session = tmp_path / "session_2026-01-01_00-00-00_000000_1"
    session.mkdir()
    (tmp_path / "session_latest").symlink_to(session)
    ray_reaper.remove_session(str(session))
    assert not session.exists() and not (tmp_path / "session_latest").is_symlink()
    assert json.dumps(ray_reaper.marked_processes("no-such-token", set())) == "[]"
