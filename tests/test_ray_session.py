"""Ray sessions (``primerge.ray_session``): warm workers across merges in one driver, and the
pre-flight check of the units that actually run on a node.

The session tests run against one real local Ray runtime that the session itself starts (its own
``RAY_TMPDIR``, so other Ray users on the machine are neither seen nor touched): two merges in the
session run their units in the processes the session warmed, write the local merge's bytes, and
the session's end stops every process it started and removes its session folder. The pre-flight
tests need no Ray: they check :func:`primerge.engine.preflight.ray_problems` on a real plan split
for the workers against a brute-force maximum over every set of units that can run at once.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import primerge
from golden.cases import build_zoo, folder_hashes
from tuning_zoo import tuning_zoo  # noqa: F401  (fixture)
from primerge.core.plan import build_plan
from primerge.core.recipe import build_recipe
from primerge.core.units import WorkerUnits
from primerge.engine import preflight, ray_reaper
from primerge.engine.preflight import ray_problems, unit_memory
from primerge.engine.ray_session import RaySession
from primerge.util.errors import ExecutionError, RecipeError

HEAD = r"^score\."


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("session") / "zoo")


def _models(zoo):
    return [zoo["t0"], zoo["t1"], zoo["t2"]]


# ------------------------------------------------------------------------------- pre-flight


def _plan(zoo, method="prime"):
    recipe = build_recipe({"base": str(zoo["base"]), "models": [str(m) for m in _models(zoo)], "method": method,
                           "task_specific": HEAD})
    return build_plan(recipe)  # the default shard size: the whole model is one shard


def test_preflight_sizes_the_units_that_run_not_the_shard(zoo, monkeypatch):
    """With the model in one shard and 2 workers, the units are tensor groups: a node that runs k
    units at once needs k worker baselines plus the k largest units' needs, which is the maximum
    over every k units that can meet there (checked by brute force), and less than k whole shards."""
    monkeypatch.setattr(preflight, "baseline_memory", lambda: 0)  # this process's RSS is not the workers'
    plan = _plan(zoo)
    try:
        units = WorkerUnits(2).split(plan.units)
        assert len(plan.units) == 1 and len(units) > 2
        needs = [unit_memory(plan, u) for u in units]
        worker = 1000
        for slots in (1, 2, 3):
            need = slots * worker + max(sum(c) for c in itertools.combinations(needs, min(slots, len(needs))))
            assert ray_problems(plan, units, [("n", slots, need, worker)], None) == []
            refused = ray_problems(plan, units, [("n", slots, need - 1, worker)], None)
            assert len(refused) == 1 and f"{slots} units at once" in refused[0] and "\n" not in refused[0]
            assert ray_problems(plan, units, [("n", slots, None, worker)], need - 1) != []  # --max-memory
        shard = unit_memory(plan, plan.units[0])  # the old estimate sized every unit as the whole shard
        assert 2 * worker + sum(sorted(needs)[-2:]) < 2 * (worker + shard)
    finally:
        plan.close()


def test_a_unit_needs_its_largest_tensor_working_set_and_its_stored_bytes(zoo):
    plan = _plan(zoo, "ties")
    try:
        unit = WorkerUnits(2).split(plan.units)[0]
        merged = [e for e in unit.entries if e.kind != "copy"]
        assert merged
        largest = max(preflight.working_set(plan, e) for e in merged)
        assert unit_memory(plan, unit) == largest + sum(e.nbytes for e in unit.entries)
    finally:
        plan.close()


# ------------------------------------------------------------------------------- errors without Ray


def test_session_settings_are_validated_before_ray_starts():
    with pytest.raises(RecipeError, match=r"workers.*greater than or equal to 1") as info:
        primerge.ray_session(workers=0)
    assert "\n" not in str(info.value)


def test_a_session_that_is_not_open_is_refused_as_execution(zoo, tmp_path):
    pytest.importorskip("ray")
    session = primerge.ray_session(workers=1)
    with pytest.raises(RecipeError, match="not open") as info:
        primerge.merge(zoo["base"], _models(zoo), "task_arithmetic", task_specific=HEAD, out=tmp_path / "o",
                       execution=session)
    assert "\n" not in str(info.value) and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------- a real session


@pytest.fixture
def ray_tmp(monkeypatch):
    """A fresh, short Ray temporary folder (Unix socket paths must stay under 108 bytes), and the
    private clusters' authentication mode (:data:`primerge.bench.cluster.RAY_ENV`): Ray 2.60 keeps
    authentication state across ``ray.init`` calls in one process, and a token-authenticated local
    runtime, then a private cluster, then another token runtime in one process fails to start
    ("Failed to start GCS": the driver sends no token)."""
    from primerge.bench.cluster import RAY_ENV

    folder = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    yield folder / "ray"
    shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _gone(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(_alive(p) for p in pids)


@pytest.mark.slow
def test_merges_in_a_session_run_on_its_warm_workers_and_its_end_stops_what_it_started(zoo, tmp_path, ray_tmp):
    """Two merges (TIES with its model-wide pre-pass, then PRIME, from a recipe file asking for
    ``backend: ray``) in one session of two workers: every unit of both runs in one of the two
    processes the session warmed (torch and the engine imported once, before the first merge),
    the outputs are the local merge's bytes, settings that differ from the session's and a second
    session are refused with one line, and closing the session stops its runtime's processes
    (the warm workers included) and removes its session folder."""
    ray = pytest.importorskip("ray")
    kw = dict(task_specific=HEAD, shard_size=3000)
    local = {"ties": primerge.merge(zoo["base"], _models(zoo), "ties", out=tmp_path / "local-ties", trim_scope="model",
                                    **kw).out,
             "prime": primerge.merge(zoo["base"], _models(zoo), "prime", out=tmp_path / "local-prime", **kw).out}
    recipe = tmp_path / "prime.yaml"
    recipe.write_text(f"base: {zoo['base']}\nmodels: [{', '.join(str(m) for m in _models(zoo))}]\n"
                      f"method: prime\ntask_specific: '{HEAD}'\nexecution: {{backend: ray}}\n")
    with primerge.ray_session(workers=2) as session:
        assert ray.is_initialized() and RaySession.current() is session
        warm = set(session.warm_workers)
        assert len(warm) == 2, warm
        token = session.runtime.reaper.args[2]
        first = primerge.merge(zoo["base"], _models(zoo), "ties", out=tmp_path / "ray-ties", execution=session,
                               trim_scope="model", **kw)
        second = primerge.merge_recipe(recipe, out=tmp_path / "ray-prime", shard_size=3000)
        for result in (first, second):
            assert set(result.execution["units_per_worker"]) <= warm, (result.execution, warm)
            assert result.execution["first_unit_after_s"] >= 0
        with pytest.raises(RecipeError, match=r"workers 3 \(the session's: 2\)") as info:
            primerge.merge(zoo["base"], _models(zoo), "ties", out=tmp_path / "refused",
                           execution={"backend": "ray", "workers": 3}, **kw)
        assert "\n" not in str(info.value) and not (tmp_path / "refused").exists()
        with pytest.raises(ExecutionError, match="already open"):
            primerge.ray_session(workers=1).open()
    assert not ray.is_initialized() and RaySession.current() is None
    for method, out in (("ties", first.out), ("prime", second.out)):
        assert folder_hashes(out, tmp_path) == folder_hashes(local[method], tmp_path)
    pids = [int(w.rsplit(":", 1)[1]) for w in warm]
    assert _gone(pids, 4 * ray_reaper.GRACE + 30), "the session's warm workers outlived it"
    assert ray_reaper.marked_processes(token, set()) == []
    assert not list(ray_tmp.glob("session_*"))


@pytest.mark.slow
def test_tune_runs_every_trial_of_a_ray_recipe_in_one_session(tuning_zoo, tmp_path, ray_tmp, monkeypatch):
    """``primerge tune`` on a recipe with ``backend: ray`` holds one session for the whole run: every
    trial's merge and the confirming merge of the best recipe run their units on the same warm
    workers (Ray would start a new job's workers for every merge otherwise), and the session is
    closed when tuning ends."""
    ray = pytest.importorskip("ray")
    from primerge.core.recipe import build_recipe
    from primerge.tuning import EncoderSuite, TuneSettings, tune
    from primerge.tuning import cache as tuning_cache
    from primerge.tuning import run as tuning_run

    seen = []

    def recording(merge):
        def merge_recipe(*args, **kwargs):
            result = merge(*args, **kwargs)
            seen.append((RaySession.current(), set(result.execution["units_per_worker"])))
            return result
        return merge_recipe

    monkeypatch.setattr(tuning_cache, "merge_recipe", recording(tuning_cache.merge_recipe))
    monkeypatch.setattr(tuning_run, "merge_recipe", recording(tuning_run.merge_recipe))
    recipe = build_recipe({**tuning_zoo["recipe"], "method": "ties", "execution": {"backend": "ray", "workers": 2}})
    suite = EncoderSuite(recipe, tuning_zoo["splits"], size=20, cache=tmp_path / "cache")
    result = tune(recipe, suite, settings=TuneSettings(trials=3), out=tmp_path / "out", log=lambda m: None)
    assert result.results[0].confirmed_value is not None
    sessions = {id(session) for session, _ in seen}
    assert len(seen) >= 3 and len(sessions) == 1 and seen[0][0] is not None, seen
    warm = set(seen[0][0].warm_workers)
    assert len(warm) == 2 and all(workers <= warm for _, workers in seen), (seen, warm)
    assert RaySession.current() is None and not ray.is_initialized()


# ------------------------------------------------------------------------------- bench's cold and warm rows


def test_a_child_merge_reports_its_start_up_from_launch_and_fails_in_one_line(tmp_path):
    """The start-up of a Ray row is the first unit's epoch time minus the moment the parent launched
    the merge (so the child's own Python and torch start are in it); a child that fails gives its
    error line as the bench's one-line error."""
    import sys

    from primerge.bench import RAY_COLD, RAY_WARM
    from primerge.bench.report import summarize
    from primerge.bench.runs import Measurement, Row, measure_merge

    child = ("import time; print(f'first unit at: {time.time() + 30:.3f}'); print('units per worker: 2 3'); "
             "print('merged with prime in 1.5s')")
    m = measure_merge(tmp_path / "r.yaml", tmp_path / "out", runner=[sys.executable, "-c", child])
    assert 30 < m.first_unit_s < 30 + m.wall_s and m.worker_units == (3, 2)
    assert Row(RAY_COLD, "z", "prime", 3, [m]).as_dict(None)["note"].startswith("first unit after 3")
    failing = "import sys; print('some log'); print('primerge: error: tensor x: NaN in model b'); sys.exit(2)"
    with pytest.raises(ExecutionError, match=r"r\.yaml failed \(exit 2\): primerge: error: tensor x: NaN") as info:
        measure_merge(tmp_path / "r.yaml", tmp_path / "out", runner=[sys.executable, "-c", failing])
    assert "\n" not in str(info.value)
    rows = [Row(group, "z", "prime", 3, [Measurement(wall, wall, 100.0, 1.0)])
            for group, wall in (("methods", 2.0), (RAY_COLD, 5.0), (RAY_WARM, 2.5))]
    assert [r["wall_x"] for r in summarize(rows, None)][1:] == [2.5, 1.25]  # Ray rows against the local one


def test_the_warm_driver_fails_in_one_line_where_no_cluster_answers():
    pytest.importorskip("ray")
    from primerge.bench.warm import WarmDriver

    refused = r"warm Ray driver .*--address 127\.0\.0\.1:1\).*connection refused"
    with pytest.raises(ExecutionError, match=refused) as info:
        WarmDriver("127.0.0.1:1", 2)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_bench_ray_rows_cold_and_warm(tmp_path, capsys):
    """``primerge bench --ray-workers 2`` on a tiny zoo: a local row, a cold Ray row (fresh driver,
    its start-up to the first unit in its note) and a warm one whose units all ran in the processes
    its session warmed, although a cold row's driver started its own workers on the same node in
    between (the bench's cluster keeps their idle workers); no Ray process is left behind."""
    from primerge.cli.main import main

    out_csv = tmp_path / "ray.csv"
    code = main(["bench", "--methods", "task_arithmetic", "--repeats", "1", "--ray-workers", "2", "--no-scaling",
                 "--no-accuracy", "--no-floors", "--cache", str(tmp_path / "cache"), "--csv", str(out_csv),
                 "--layers", "1", "--scale", "0.0625", "--tasks", "3", "--seed", "7"])
    assert code == 0
    import csv

    rows = {r["group"]: r for r in csv.DictReader(open(out_csv))}
    assert set(rows) == {"methods", "ray-cold", "ray-warm"}
    assert float(rows["ray-cold"]["wall_x"]) > 0 and float(rows["ray-warm"]["wall_x"]) > 0
    assert "first unit after" in rows["ray-cold"]["note"] and "units per worker" in rows["ray-cold"]["note"]
    reused = re.search(r"(\d+)/(\d+) units in warm workers", rows["ray-warm"]["note"])
    assert reused and int(reused[1]) == int(reused[2]) > 0, rows["ray-warm"]["note"]
    printed = capsys.readouterr().out
    assert "warm driver started" in printed
    address = re.search(r"a local cluster at (127\.0\.0\.1:\d+)", printed)[1]
    time.sleep(2)  # a stopped node's workers exit on their own within a moment
    leftover = subprocess.run(["pgrep", "-f", address], capture_output=True, text=True).stdout.split()
    assert leftover == [], f"Ray processes of the bench's cluster left behind: {leftover}"
