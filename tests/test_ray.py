"""The Ray backend against real Ray processes started here: a two-"node" cluster on the loopback
address (``ray start --head`` plus ``ray start --address``, stopped by killing exactly the process
groups these tests started), byte-identical outputs, faults, interrupts and the storage check."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import primerge

ray = pytest.importorskip("ray")

from golden.cases import build_zoo, folder_hashes  # noqa: E402
from primerge.bench.cluster import local_cluster, start_node, stop_node, wait_nodes  # noqa: E402
from primerge.core.plan import build_plan  # noqa: E402
from primerge.core.recipe import build_recipe  # noqa: E402
from primerge.core.units import WorkerUnits  # noqa: E402

pytestmark = pytest.mark.slow
HEAD = r"^score\."


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("ray") / "zoo")


@pytest.fixture(scope="module")
def cluster(zoo):
    """Head (1 CPU) and a second node (1 CPU) on 127.0.0.1; yields the address."""
    with local_cluster([1, 1]) as address:
        yield address


@pytest.fixture(scope="class")
def connected(cluster):
    """This process joined to the cluster, as a user's own ``ray.init`` would: primerge then uses
    that connection (no --address) and leaves it open."""
    ray.init(address=cluster, log_to_driver=False, configure_logging=False)
    yield cluster
    ray.shutdown()


def _wait_until_idle(timeout: float = 60.0) -> None:
    """Until every CPU of the joined cluster is free again (tasks of earlier tests release theirs
    asynchronously), or fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        assert time.monotonic() < deadline, f"the cluster's CPUs were not all free within {timeout:.0f} s"
        time.sleep(0.2)


def _models(zoo):
    return [zoo["t0"], zoo["t1"], zoo["t2"]]


CASES = {
    "prime": {}, "tsv": {}, "task_arithmetic": {}, "iso_cts": {}, "dare": {}, "drm": {},
    "ties": {"trim_scope": "model"}, "prime-auto": {"rank": "auto"}, "emr": {},
    "ho_subspace_boosting": {}, "della": {}, "consensus": {}, "breadcrumbs": {}, "iso_c": {},
    "subspace_boosting": {}, "wudi": {"steps": 20}, "knots": {}, "core_space": {},
}


class TestOnAJoinedCluster:
    """Merges on a connection this process holds (``ray.init`` once for the class)."""

    @pytest.mark.parametrize("workers", [2, 3])
    @pytest.mark.parametrize("case", sorted(CASES))
    def test_ray_writes_the_local_bytes(self, zoo, connected, tmp_path, case, workers):
        method = case.split("-")[0]
        kw = dict(task_specific=HEAD, shard_size=3000, **CASES[case])
        primerge.merge(zoo["base"], _models(zoo), method, out=tmp_path / "local", **kw)
        result = primerge.merge(zoo["base"], _models(zoo), method, out=tmp_path / "ray",
                                execution={"backend": "ray", "workers": workers}, **kw)
        local, distributed = folder_hashes(tmp_path / "local", tmp_path), folder_hashes(tmp_path / "ray", tmp_path)
        assert len([f for f in local if f.startswith("model-")]) > 2  # several units
        assert distributed == local
        assert result.execution["backend"] == "ray" and result.execution["nodes"] == 2
        assert "backend ray" in (tmp_path / "ray" / "README.md").read_text()
        assert ray.is_initialized()  # the caller's connection is left open

    def test_ray_lora_inputs_lora_output_and_memory(self, zoo, connected, tmp_path):
        ray_exec = {"backend": "ray", "workers": 2}
        adapters = [zoo["lora0"], zoo["lora1"]]
        for kw in ({"lora_rank": 3}, {}):
            primerge.merge(zoo["base"], adapters, "prime", out=tmp_path / "a", shard_size=3000, **kw)
            primerge.merge(zoo["base"], adapters, "prime", out=tmp_path / "b", shard_size=3000, execution=ray_exec, **kw)
            assert folder_hashes(tmp_path / "a", tmp_path) == folder_hashes(tmp_path / "b", tmp_path)
            for folder in ("a", "b"):
                subprocess.run(["rm", "-r", str(tmp_path / folder)], check=True)
        local = primerge.merge(zoo["base"], _models(zoo), "emr", task_specific=HEAD, shard_size=3000)
        remote = primerge.merge(zoo["base"], _models(zoo), "emr", task_specific=HEAD, shard_size=3000, execution=ray_exec)
        for attr in ("state_dict",):
            a, b = getattr(local, attr), getattr(remote, attr)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for task in local.task_states:
            assert all(torch.equal(local.task_states[task][k], remote.task_states[task][k]) for k in local.task_states[task])


    def test_a_session_over_the_callers_connection_keeps_it_open(self, zoo, connected, tmp_path):
        """A session opened where the caller holds a Ray connection uses it, runs the merge there and
        leaves the connection open when it closes, every unit merged. That the units run on the
        session's warm workers is tested on a private runtime (test_ray_session.py): on this cluster,
        shared with the module's other drivers, Ray may replace an idle worker between the warm-up and
        the merge (docs/ray.md), and this test, which asserted it, failed once in a full run."""
        kw = dict(task_specific=HEAD, shard_size=3000)
        local = primerge.merge(zoo["base"], _models(zoo), "tsv", out=tmp_path / "local", **kw).out
        _wait_until_idle()  # the session warms one worker per free slot: the class's earlier merges' tasks are gone
        with primerge.ray_session(workers=2) as session:
            assert session.where() == "this process's Ray connection" and session.warm_workers
            result = primerge.merge(zoo["base"], _models(zoo), "tsv", out=tmp_path / "ray", execution=session, **kw)
        assert sum(result.execution["units_per_worker"].values()) == len(WorkerUnits(2).split(build_plan(
            build_recipe({"base": str(zoo["base"]), "models": [str(m) for m in _models(zoo)], "method": "tsv",
                          "task_specific": HEAD}), shard_size=3000).units))
        assert folder_hashes(result.out, tmp_path) == folder_hashes(local, tmp_path)
        assert ray.is_initialized()


def test_a_session_joined_by_address_disconnects_and_leaves_the_cluster_running(zoo, cluster, tmp_path):
    with primerge.ray_session(cluster, workers=2) as session:
        result = primerge.merge(zoo["base"], _models(zoo), "task_arithmetic", task_specific=HEAD, shard_size=3000,
                                out=tmp_path / "ray", execution={"backend": "ray", "address": cluster})
        assert set(result.execution["units_per_worker"]) <= set(session.warm_workers)
    assert not ray.is_initialized()
    wait_nodes(cluster, 2, timeout=60)  # both nodes still answer


def test_joining_by_address_leaves_ray_as_it_was_found(zoo, cluster, tmp_path):
    kw = dict(task_specific=HEAD, shard_size=3000)
    primerge.merge(zoo["base"], _models(zoo), "ties", out=tmp_path / "local", **kw)
    result = primerge.merge(zoo["base"], _models(zoo), "ties", out=tmp_path / "ray",
                            execution={"backend": "ray", "address": cluster}, **kw)
    assert folder_hashes(tmp_path / "ray", tmp_path) == folder_hashes(tmp_path / "local", tmp_path)
    recipe = build_recipe({"base": str(zoo["base"]), "models": [str(m) for m in _models(zoo)], "method": "ties",
                           "task_specific": HEAD})
    units = len(WorkerUnits(2).split(build_plan(recipe, shard_size=3000).units))  # the cluster's 2 CPUs: 2 workers
    assert sum(result.execution["units_per_worker"].values()) == units
    assert units > len(list((tmp_path / "ray").glob("model-*.safetensors")))  # shards split for the workers
    assert set(result.execution["units_per_second"]) <= set(result.execution["units_per_worker"])
    assert all(rate > 0 for rate in result.execution["units_per_second"].values())
    assert result.execution["worker_peak_rss_mib"] > 0
    assert not ray.is_initialized()


def test_a_primerge_error_in_a_unit_stops_the_run_with_that_error(zoo, cluster, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    state = load_file(str(zoo["t1"] / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][3, 3] = float("nan")  # found only when the tensor is read
    save_file(state, str(broken / "model.safetensors"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {zoo['base']}\nmodels: [{zoo['t0']}, {broken}]\nmethod: prime\n"
                      f"task_specific: '{HEAD}'\nexecution: {{backend: ray, address: '{cluster}'}}\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "primerge", "merge", str(recipe), "--out", str(out), "--quiet",
                           "--shard-size", "3000"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("primerge: error:")]
    assert len(lines) == 1 and "model.layers.1.mlp.up_proj.weight" in lines[0] and "NaN" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.primerge-*"))


@pytest.fixture(scope="module")
def slow_zoo(tmp_path_factory):
    """Units that take seconds: four 640 × 640 matrices merged by TSV with exact SVDs."""
    root = tmp_path_factory.mktemp("slow")
    gen = torch.Generator().manual_seed(5)
    base = {f"layers.{i}.proj.weight": torch.randn(640, 640, generator=gen) for i in range(4)}
    paths = {}
    for name, shift in (("base", 0.0), ("a", 0.01), ("b", 0.02), ("c", 0.03)):
        folder = root / name
        folder.mkdir()
        state = {k: v + shift * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        save_file(state if shift else base, str(folder / "model.safetensors"))
        paths[name] = folder
    return paths


def _ray_unit_pids() -> list[int]:
    """Ray workers running a unit now (Ray titles a busy worker ``ray::<task name>``)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(pid) for pid, _, args in (line.strip().partition(" ") for line in out.splitlines())
            if args.split()[:1] in (["ray::_unit"], ["ray::_unit()"])]


def test_a_worker_killed_mid_unit_is_retried_and_the_bytes_do_not_change(slow_zoo, cluster, tmp_path):
    """The model is one shard merged as four groups (parts joined by the driver), so the retried unit
    rewrites a part and what the killed worker left of it is removed."""
    models = [slow_zoo["a"], slow_zoo["b"], slow_zoo["c"]]
    kw = dict(svd="exact")
    primerge.merge(slow_zoo["base"], models, "tsv", out=tmp_path / "local", **kw)
    killed: list[int] = []

    def kill_one() -> None:
        deadline = time.time() + 600
        while not killed and time.time() < deadline:
            for pid in _ray_unit_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one)
    killer.start()
    primerge.merge(slow_zoo["base"], models, "tsv", out=tmp_path / "ray",
                   execution={"backend": "ray", "address": cluster, "workers": 2}, **kw)
    killer.join()
    assert killed, "no running unit was found to kill"
    assert folder_hashes(tmp_path / "ray", tmp_path) == folder_hashes(tmp_path / "local", tmp_path)


def test_a_model_in_one_shard_gives_every_worker_units(slow_zoo, cluster, tmp_path):
    """At the default shard size the four matrices are one shard, which used to be one unit for one
    worker; at 2 workers each matrix is a unit of its own (a quarter of the model, more than the
    eighth a group may hold), units take seconds, so both workers merge some, and the shard joined
    from their parts has the local merge's bytes."""
    models = [slow_zoo["a"], slow_zoo["b"], slow_zoo["c"]]
    primerge.merge(slow_zoo["base"], models, "tsv", out=tmp_path / "local", svd="exact")
    result = primerge.merge(slow_zoo["base"], models, "tsv", out=tmp_path / "ray", svd="exact",
                            execution={"backend": "ray", "address": cluster, "workers": 2})
    assert folder_hashes(tmp_path / "ray", tmp_path) == folder_hashes(tmp_path / "local", tmp_path)
    assert [p.name for p in (tmp_path / "ray").glob("model*.safetensors")] == ["model.safetensors"]
    per_worker = result.execution["units_per_worker"]
    assert sum(per_worker.values()) == 4 and len(per_worker) == 2, per_worker


#: ``python -m primerge`` with Ctrl-C's default disposition (raise KeyboardInterrupt), unblocked, whatever
#: this test process's: a child inherits an ignored or blocked SIGINT, and Python keeps it so.
INTERRUPTIBLE = [sys.executable, "-c", "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                 "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); sys.argv[0] = 'primerge'; "
                 "runpy.run_module('primerge', run_name='__main__')"]


def test_ctrl_c_on_the_driver_cancels_the_units_and_leaves_nothing(slow_zoo, cluster, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {slow_zoo['base']}\nmodels: [{slow_zoo['a']}, {slow_zoo['b']}, {slow_zoo['c']}]\n"
                      f"method: tsv\nparameters: {{svd: exact}}\n"
                      f"execution: {{backend: ray, address: '{cluster}', workers: 2}}\n")
    out = tmp_path / "out"
    child = subprocess.Popen([*INTERRUPTIBLE, "merge", str(recipe), "--out", str(out), "--quiet", "--shard-size", "2MB"],
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not (list(tmp_path.glob(".out.primerge-*")) and (running := _ray_unit_pids())):
        assert time.time() < deadline and child.poll() is None, "the merge never started a unit"
        time.sleep(0.05)
    for pid in running:  # hold the running units, so that the Ctrl-C lands while this merge waits for them
        os.kill(pid, signal.SIGSTOP)
    try:
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=300)
    finally:
        for pid in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert child.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.primerge-*"))
    deadline = time.time() + 60
    while _ray_unit_pids():  # the cancelled units stop too
        assert time.time() < deadline, "units kept running after the driver was interrupted"
        time.sleep(0.5)


def test_units_on_two_kinds_of_node_are_reported(slow_zoo, cluster, tmp_path, capfd):
    """A third node whose workers run ATen's ``default`` kernels (``ATEN_CPU_CAPABILITY``) beside
    nodes on this CPU's own: the merge says on stderr and in the card that units ran on two kinds of
    node and that byte-identity holds within a kind; the outputs still agree with a local merge to the
    golden test's round-off tolerance. Units take seconds (exact SVDs of 640 × 640) and three run at
    once on three one-CPU nodes, so every node merges some."""
    from golden.cases import ROUNDOFF

    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU's own kernels are ATen's default ones: no second kind to start")
    node = start_node(["--address", cluster, "--num-cpus", "1"], prefix=["env", "ATEN_CPU_CAPABILITY=default"])
    models = [slow_zoo["a"], slow_zoo["b"], slow_zoo["c"]]
    try:
        wait_nodes(cluster, 3)
        local = primerge.merge(slow_zoo["base"], models, "tsv", svd="exact").state_dict
        result = primerge.merge(slow_zoo["base"], models, "tsv", svd="exact", out=tmp_path / "out",
                                execution={"backend": "ray", "address": cluster, "workers": 3})
    finally:
        stop_node(node)
    kinds = result.execution["machine_kinds"]
    assert len(kinds) == 2 and any(", DEFAULT, " in kind for kind in kinds), kinds
    assert "units merged on 2 kinds of node" in capfd.readouterr().err
    assert "byte-identity holds within a kind" in (tmp_path / "out" / "README.md").read_text()
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = load_file(str(slow_zoo["base"] / "model.safetensors"))
    assert not [k for k in local if ROUNDOFF.problem(k, merged[k], local[k], base.get(k))]


def test_a_node_that_cannot_see_an_input_fails_the_run_before_merging(zoo, cluster, tmp_path):
    """A third node whose mount namespace hides the zoo (a tmpfs over it): the run names the node
    and the path, and nothing is written. Runs last: it changes the module's cluster."""
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("this machine does not allow mount namespaces (unshare -m), needed to hide a path")
    hidden = zoo["base"].parent
    node = start_node(["--address", cluster, "--num-cpus", "1"],
                      prefix=["unshare", "-m", "--propagation", "private", "sh", "-c",
                              f'mount -t tmpfs none "{hidden}" && exec "$0" "$@"'])
    try:
        wait_nodes(cluster, 3)
        with pytest.raises(primerge.InputError, match=r"Ray node .* cannot see .*zoo") as info:
            primerge.merge(zoo["base"], _models(zoo), "prime", task_specific=HEAD, out=tmp_path / "out",
                           execution={"backend": "ray", "address": cluster})
        assert "shared filesystem" in str(info.value)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.primerge-*"))
    finally:
        stop_node(node)


def test_a_node_that_cannot_start_fails_fast_not_after_the_timeout():
    """`ray start` exits on an option it refuses; the cluster helper says so at once (it used to
    poll a dead head for ten minutes when bench passed --num-gpus 0.0)."""
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="exited with code"):
        with local_cluster([1], gpus=-1):
            pass
    assert time.perf_counter() - start < 45
