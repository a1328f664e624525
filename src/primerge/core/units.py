"""Work units: the groups of output tensors a merge runs as one piece of work.

A plan's own units are its output shards (:func:`shard_units`): the tensors of one shard each, in
base order, split by the rule :class:`primerge.io.writer.ShardedWriter` shards by. One process runs
them one after the other. Parallel workers need more pieces than a model has shards (with the
default 2 GB shards a model under 2 GB is one unit), so an executor of N workers splits the shards
with :class:`WorkerUnits` into consecutive tensor groups of at most 1/(k·N) of the model each. A
shard split into groups is written group by group and joined, in order, into the same shard file
by the output (:class:`primerge.output.folder.ModelFolder`); other outputs take the tensors in
order whatever the grouping.

Any split gives the same output: executing a unit is a pure function of (plan, unit, pre-pass
result), and a pre-pass reduces its per-tensor statistics exactly, whatever the split
(:class:`primerge.methods.base.Prepass`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from primerge.core.sources import PlanEntry


@dataclass(frozen=True)
class WorkUnit:
    """Consecutive entries of output shard ``shard``, in base order: the whole shard (part 0 of 1)
    or group ``part`` of the ``parts`` it is split into for parallel workers; ``index`` counts
    units from 0."""

    index: int
    entries: tuple[PlanEntry, ...]
    shard: int = 0
    part: int = 0
    parts: int = 1

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def shard_units(entries: list[PlanEntry], shard_size: int) -> list[WorkUnit]:
    """Split entries, in order, into units of at most ``shard_size`` stored bytes (a tensor larger
    than that is a unit of its own): the rule :class:`primerge.io.writer.ShardedWriter` shards by."""
    units: list[list[PlanEntry]] = [[]]
    filled = 0
    for entry in entries:
        if units[-1] and filled + entry.nbytes > shard_size:
            units.append([])
            filled = 0
        units[-1].append(entry)
        filled += entry.nbytes
    return [WorkUnit(i, tuple(u), shard=i) for i, u in enumerate([u for u in units if u])]


@dataclass(frozen=True)
class WorkerUnits:
    """The shards split for ``workers`` parallel workers into groups of consecutive tensors.

    With S the model's stored bytes and N = ``workers``, every shard is cut by the shard rule
    itself (:func:`shard_units`) at s = S / (N · ``per_worker``) bytes: a group holds consecutive
    tensors up to s bytes (a larger tensor is a group of its own, a tensor is never cut), and no
    group spans two shards. Any two consecutive groups of a shard together exceed s, so there are
    at most 2·N·``per_worker`` + (shards) groups: a small model does not become many tiny tasks,
    and a model already in shards of at most s bytes keeps them. Workers take units as they free
    up (list scheduling): no worker idles before the last unit starts, so it starts by (S − p)/N
    and the merge ends by S/N + p (work counted in bytes, p the last unit's; Graham, "Bounds for
    certain multiprocessing anomalies", Bell System Technical Journal 45, 1966): within
    1/``per_worker`` of the ideal S/N when no tensor exceeds s. One worker keeps the shards: there
    is nothing to balance.
    """

    workers: int
    per_worker: int = 4

    def split(self, shards: Sequence[WorkUnit]) -> tuple[WorkUnit, ...]:
        """The groups of every shard, in order, numbered from 0."""
        if self.workers <= 1:
            return tuple(shards)
        size = sum(u.nbytes for u in shards) // (self.workers * self.per_worker)
        units: list[WorkUnit] = []
        for shard in shards:
            groups = shard_units(list(shard.entries), size)
            for group in groups:
                units.append(WorkUnit(len(units), group.entries, shard.shard, group.index, len(groups)))
        return tuple(units)
