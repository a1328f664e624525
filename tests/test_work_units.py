"""Units sized for the workers (:class:`primerge.core.units.WorkerUnits`): how shards are split into
tensor groups, and that merges run on those groups write the bytes of a local merge.

The split's properties are checked on synthetic entries; the merges run the split units in this
process (:class:`SplitInProcess`: what the Ray executor runs, without starting a cluster), with
every group written as a part file and joined into its shard by the model folder, against the
local executor on the golden zoo."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import save_file

import primerge
import primerge.api
from golden.cases import build_zoo, folder_hashes
from primerge.core.sources import PlanEntry
from primerge.core.units import WorkerUnits, WorkUnit, shard_units
from primerge.engine.stream import LocalExecutor, execute_unit, fold_units, prepass_statistics
from primerge.io.writer import join_files
from primerge.util.errors import OutputError

HEAD = r"^score\."


def _entries(sizes: list[int]) -> list[PlanEntry]:
    """One uint8 vector entry of each size (its stored bytes)."""
    return [PlanEntry(f"t{i}", "fallback", (n,), torch.uint8) for i, n in enumerate(sizes)]


def _check_split(shards: list[WorkUnit], units: tuple[WorkUnit, ...], workers: int, per_worker: int) -> None:
    """Every property the split promises, on any input."""
    assert [u.index for u in units] == list(range(len(units)))
    # every tensor once, in order
    assert [e for u in units for e in u.entries] == [e for s in shards for e in s.entries]
    assert all(u.entries for u in units)
    size = sum(s.nbytes for s in shards) // (workers * per_worker)
    for shard in shards:
        groups = [u for u in units if u.shard == shard.shard]
        assert [e for g in groups for e in g.entries] == list(shard.entries)  # no group spans two shards
        assert [(g.part, g.parts) for g in groups] == [(p, len(groups)) for p in range(len(groups))]
        assert all(len(g.entries) == 1 or g.nbytes <= size for g in groups)  # a larger tensor alone
        assert all(a.nbytes + b.nbytes > size for a, b in zip(groups, groups[1:]))  # no two would fit in one
    assert len(units) <= 2 * workers * per_worker + len(shards)


def test_a_one_shard_model_of_equal_tensors_is_split_evenly():
    shards = shard_units(_entries([100] * 16), shard_size=10**9)
    assert len(shards) == 1
    units = WorkerUnits(2).split(shards)
    assert [len(u.entries) for u in units] == [2] * 8  # 2 workers x 4 units of S/8
    _check_split(shards, units, 2, 4)


def test_a_large_tensor_is_a_group_of_its_own_and_the_rest_fills_groups():
    """An embedding of a third of the model at each end (as the bench zoo's) and 24 small tensors."""
    shards = shard_units(_entries([2400] + [100] * 24 + [2400]), shard_size=10**9)
    units = WorkerUnits(2).split(shards)
    _check_split(shards, units, 2, 4)
    assert [len(u.entries) for u in units] == [1, 9, 9, 6, 1]  # S/8 = 900 bytes: nine small tensors


def test_one_worker_and_many_small_shards_keep_the_shards():
    shards = shard_units(_entries([100] * 16), shard_size=10**9)
    assert WorkerUnits(1).split(shards) == tuple(shards)
    many = shard_units(_entries([100] * 64), shard_size=200)  # 32 shards, each below S / 8
    assert WorkerUnits(2).split(many) == tuple(many)


@pytest.mark.parametrize("seed", range(30))
def test_any_split_keeps_every_tensor_once_in_order_within_its_shard(seed):
    rng = random.Random(seed)
    sizes = [rng.choice([0, 1, 7, 64, 300, 5000]) for _ in range(rng.randint(1, 60))]
    shards = shard_units(_entries(sizes), shard_size=rng.choice([500, 4000, 10**9]))
    workers, per_worker = rng.randint(2, 9), rng.randint(1, 6)
    _check_split(shards, WorkerUnits(workers, per_worker).split(shards), workers, per_worker)


# --------------------------------------------------------------------------- joining parts


def test_joined_parts_are_the_bytes_of_one_write(tmp_path):
    """Groups written in plan order, joined: the file one save of all the tensors gives (safetensors
    orders a file by dtype and name), for mixed dtypes; the parts are removed."""
    gen = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(5, 3, generator=gen).bfloat16(), "a.ids": torch.arange(7),
               "c.bias": torch.randn(4, generator=gen), "a.mask": torch.rand(6, generator=gen) > 0.5,
               "d.half": torch.randn(2, 2, generator=gen).half()}
    save_file(tensors, str(tmp_path / "whole.safetensors"), {"format": "pt"})
    names = list(tensors)
    parts = [tmp_path / f".part{i}" for i in range(3)]
    for part, chunk in zip(parts, (names[:2], names[2:3], names[3:])):
        save_file({k: tensors[k] for k in chunk}, str(part), {"format": "pt"})
    join_files(parts, tmp_path / "joined.safetensors", {"format": "pt"})
    assert (tmp_path / "joined.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    assert not any(p.exists() for p in parts)


def test_a_part_that_cannot_be_read_is_an_output_error(tmp_path):
    part = tmp_path / ".part0"
    part.write_bytes(b"not a safetensors file")
    with pytest.raises(OutputError, match=r"\.part0: cannot read back a part of out\.safetensors"):
        join_files([part], tmp_path / "out.safetensors", {"format": "pt"})


# --------------------------------------------------------------------------- merges on split units


class SplitInProcess(LocalExecutor):
    """The plan's shards split for ``workers`` (as the Ray executor splits them), run in this
    process: pre-pass statistics folded per group in unit order, every group written by the
    output's unit writer."""

    def __init__(self, workers: int) -> None:
        super().__init__(torch.device("cpu"))
        self.split = WorkerUnits(workers)
        self.counts: list[int] = []

    def prepass(self, plan, quiet):
        prepass = plan.recipe.spec.make_prepass(plan.method_params)
        if prepass is None:
            return None
        units = self.split.split(plan.units)
        for i in range(prepass.passes):
            prepass.end_pass(i, fold_units(prepass, (prepass_statistics(plan, prepass, i, u.entries, self.device)
                                                     for u in units)))
        return prepass.result()

    def units(self, plan, prepass, writer, quiet):
        units = self.split.split(plan.units)
        self.counts.append(len(units))
        for unit in units:
            yield unit, writer.write(unit, execute_unit(plan, unit, self.device, prepass))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("units") / "zoo")


def _merged(zoo, monkeypatch, executor, method, **kw):
    """The zoo's merge with ``executor`` running its units."""
    with monkeypatch.context() as patch:
        patch.setattr(primerge.api, "make_executor", lambda config, device: executor)
        return primerge.merge(zoo["base"], [zoo["t0"], zoo["t1"], zoo["t2"]], method, task_specific=HEAD, **kw)


def _merge_both(zoo, tmp_path, monkeypatch, method, **kw) -> SplitInProcess:
    """The same merge into ``local`` by the local executor and into ``split`` on split units."""
    _merged(zoo, monkeypatch, LocalExecutor(torch.device("cpu")), method, out=tmp_path / "local", **kw)
    split = SplitInProcess(3)
    _merged(zoo, monkeypatch, split, method, out=tmp_path / "split", **kw)
    return split


CASES = {"task_arithmetic": {}, "ties": {"trim_scope": "model"}, "prime": {"rank": "auto"}, "emr": {},
         "tsv": {}, "dare": {}}


@pytest.mark.parametrize("shard_size", [2 * 1024**3, 6000])
@pytest.mark.parametrize("method", sorted(CASES))
def test_split_units_write_the_bytes_of_a_local_merge(zoo, tmp_path, monkeypatch, method, shard_size):
    """One shard (the default size: the whole model split into groups) and several shards, some
    split: every file, the manifest included, has the local merge's bytes, no part file is left,
    and the merge really ran on more units than shards."""
    executor = _merge_both(zoo, tmp_path, monkeypatch, method, shard_size=shard_size, **CASES[method])
    local, split = folder_hashes(tmp_path / "local", tmp_path), folder_hashes(tmp_path / "split", tmp_path)
    assert split == local
    manifest = "primerge-manifest.json"
    assert (tmp_path / "split" / manifest).read_bytes() == (tmp_path / "local" / manifest).read_bytes()
    shards = len(list((tmp_path / "local").glob("model*.safetensors")))
    assert executor.counts[0] > shards
    names = {side: sorted(p.name for p in (tmp_path / side).rglob("*")) for side in ("split", "local")}
    assert names["split"] == names["local"]  # no part file left


def test_split_units_write_the_local_lora_adapter(zoo, tmp_path, monkeypatch):
    _merge_both(zoo, tmp_path, monkeypatch, "tsv", lora_rank=3)
    assert folder_hashes(tmp_path / "split", tmp_path) == folder_hashes(tmp_path / "local", tmp_path)


def test_split_units_give_the_local_tensors_in_memory(zoo, monkeypatch):
    split = SplitInProcess(3)
    merged = _merged(zoo, monkeypatch, split, "emr")
    local = _merged(zoo, monkeypatch, LocalExecutor(torch.device("cpu")), "emr")
    assert split.counts[0] > 1
    assert list(merged.state_dict) == list(local.state_dict)
    assert all(torch.equal(merged.state_dict[k], local.state_dict[k]) for k in local.state_dict)
    for task, tensors in local.task_states.items():
        assert all(torch.equal(merged.task_states[task][k], v) for k, v in tensors.items())
