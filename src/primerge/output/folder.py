"""Folder outputs: a merged model (:class:`ModelFolder`) or a PEFT LoRA adapter (:class:`LoraFolder`).

Both are written into a temporary folder beside the destination (:func:`primerge.io.writer.atomic_folder`)
and published by one rename when the merge finished; every tensor is recorded in a
:class:`~primerge.io.manifest.Ledger`, and before the rename the folder gets the task heads
(``task_heads/<model>.safetensors``), the model card (with each output's own sections) and the
manifest, checked against what was computed.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from primerge.util.errors import OutputError, RecipeError
from primerge.io.destination import Destination, destination
from primerge.io.manifest import Ledger, tensor_record
from primerge.io.writer import atomic_folder, join_files, save_tensors, shard_name, write_index
from primerge.output.base import MergedTensor, MergeResult, PerTaskTensor, Sink, output_format, task_heads
from primerge.output.card import CARD, input_records, write_card
from primerge.output.heads import write_heads
from primerge.output.lora import LoraExport, LoraParts, lora_task_type
from primerge.output.per_task import PerTaskWriter
from primerge.core.plan import Plan, WorkUnit
from primerge.core.recipe import Recipe
from primerge.core.support_files import OutputFile


def check_output(out: object, recipe: Recipe, force: object) -> Destination:
    """The checked output location: never an input, inside one or holding one's files; an existing
    folder only when empty or, with ``force``, an earlier primerge output (:mod:`primerge.io.destination`)."""
    return destination(out, recipe.inputs(), force=force)


class FolderSink(Sink):
    """A folder written atomically: subclasses write their files, this class the rest. Every
    folder output is built as ``cls(out, recipe, force=..., shard_size=...)``."""

    #: whether the base folder's support files (config, tokenizer) are copied in
    copies_support_files = True

    def __init__(self, out: Path, recipe: Recipe, *, force: bool = False, shard_size: int) -> None:
        self.target = check_output(out, recipe, force)  # checked again just before the rename
        self.out = self.target.path
        self.force = force
        self.shard_size = shard_size

    @contextmanager
    def session(self, plan: Plan, prepass: Any) -> Iterator[None]:
        self.plan = plan
        with atomic_folder(self.target) as folder:
            self.folder, self.ledger = folder, Ledger(folder, card=CARD)
            self.open(plan, prepass)
            yield

    @abstractmethod
    def open(self, plan: Plan, prepass: Any) -> None:
        """Prepare the writers inside the temporary folder."""

    @abstractmethod
    def write(self, result: MergeResult) -> tuple[list[str], list[str]]:
        """Finish the output's own files; returns (weight file names, card sections)."""

    def finish(self, result: MergeResult) -> None:
        files, sections = self.write(result)
        heads = task_heads(self.plan)
        if heads:
            write_heads(self.folder, heads, {s.label: s.architectures() for s in self.plan.sources}, self.ledger)
        copied = write_support_files(self.plan.files, self.folder) if self.copies_support_files else []
        result.out = self.out
        result.inputs = input_records(self.plan)
        write_card(self.folder, self.plan.recipe, result, files, heads, copied, self.plan.card_sections() + sections)
        self.ledger.seal()


def write_support_files(files: tuple[OutputFile, ...], folder: Path) -> list[str]:
    """Write the plan's support files (config, tokenizer, ...) into ``folder``; their names."""
    for file in files:
        file.write(folder)
    return [file.name for file in files]


PART_MARK = ".part-"
#: A group's part of a shard split for parallel workers: ``.<shard>.group-0000p``, joined into the shard.
GROUP_MARK = ".group-"
#: The metadata of every weight file: one key, as safetensors writes several in a varying order.
SHARD_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class ShardReceipt:
    """What a model folder's unit writer reports: the ``file`` written (the shard, or a group's part
    of it), its tensors' records (:func:`~primerge.io.manifest.tensor_record`), a per-task method's
    (name, τ_uni, tensors), and the ``shard`` file the tensors belong to."""

    file: str
    records: dict[str, dict]
    per_task: list[tuple[str, Tensor, dict[str, Tensor]]]
    shard: str


@dataclass(frozen=True)
class ShardFiles:
    """Writes a unit's tensors into ``folder`` where the unit runs: shard s of n as
    ``model-0000(s+1)-of-0000n.safetensors``, or, for a group of a shard split for parallel workers
    (:class:`primerge.core.units.WorkerUnits`), the part file ``.<shard>.group-0000p`` that
    :class:`ShardJoin` joins into the shard."""

    folder: Path
    shards: int
    per_task: bool

    def write(self, unit: WorkUnit, tensors: Iterable[MergedTensor]) -> ShardReceipt:
        values, parts = {}, []
        for merged in tensors:
            values.update({name: tensor.contiguous() for name, tensor in merged.stored().items()})
            if self.per_task and isinstance(merged, PerTaskTensor):
                parts.append((merged.name, merged.unified, merged.task_tensors))
        shard = shard_name("model", unit.shard, self.shards)
        name = group_file(shard, unit.part, unit.parts)
        # a worker killed mid-write leaves only this
        temp = self.folder / f".{name.lstrip('.')}{PART_MARK}{os.getpid()}"
        save_tensors(temp, values, SHARD_METADATA)
        os.replace(temp, self.folder / name)
        return ShardReceipt(name, {k: tensor_record(v) for k, v in values.items()}, parts, shard)


def group_file(shard: str, part: int, parts: int) -> str:
    """The file group ``part`` of ``parts`` of ``shard`` is written as (the shard itself for one group)."""
    return shard if parts == 1 else f".{shard}{GROUP_MARK}{part:05d}"


class ShardJoin:
    """Takes a model folder's receipts in unit order and gives back each shard's once it is
    complete: a whole shard's as it came; a split shard's after its last group, its part files
    joined into the shard file (:func:`primerge.io.writer.join_files`: byte for byte the file one
    writer of all its tensors writes, which is what a local merge writes)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.groups: list[ShardReceipt] = []

    def take(self, unit: WorkUnit, receipt: ShardReceipt) -> ShardReceipt | None:
        self.groups.append(receipt)
        if unit.part < unit.parts - 1:
            return None
        groups, self.groups = self.groups, []
        if [g.file for g in groups] != [group_file(receipt.shard, p, unit.parts) for p in range(unit.parts)]:
            raise OutputError(f"{receipt.shard}: its {unit.parts} groups did not arrive one after the other; an "
                              f"executor must yield units in unit order.")
        if unit.parts > 1:
            join_files([self.folder / g.file for g in groups], self.folder / receipt.shard, SHARD_METADATA)
        records = {name: record for g in groups for name, record in g.records.items()}
        return ShardReceipt(receipt.shard, records, [p for g in groups for p in g.per_task], receipt.shard)


@output_format("model")
class ModelFolder(FolderSink):
    """The merged model as sharded safetensors (Hugging Face layout: one shard per plan unit, written
    by that unit or joined from its groups' parts, :class:`ShardJoin`); a
    per-task method's τ_uni, masks and scalars beside it (:mod:`primerge.output.per_task`)."""

    def open(self, plan: Plan, prepass: Any) -> None:
        spec = plan.recipe.spec
        self.weight_map: dict[str, str] = {}
        self.join = ShardJoin(self.folder)
        self.per_task = None
        if spec.per_task:
            self.per_task = PerTaskWriter(self.folder, spec, plan.labels, prepass.task_scalars(),
                                          self.shard_size, self.ledger)

    def unit_writer(self) -> ShardFiles:
        return ShardFiles(self.folder, len(self.plan.units), self.per_task is not None)

    def receive(self, unit: WorkUnit, receipt: ShardReceipt) -> None:
        shard = self.join.take(unit, receipt)
        if shard is None:  # a group of a shard whose later groups are still to come
            return
        self.ledger.add(self.folder / shard.file, shard.records)
        self.weight_map.update(dict.fromkeys(shard.records, shard.file))
        for name, unified, tensors in shard.per_task:
            self.per_task.add(name, unified, tensors)

    def write(self, result: MergeResult) -> tuple[list[str], list[str]]:
        for stray in self.folder.glob(f".*{PART_MARK}*"):  # from workers killed mid-write, then retried
            stray.unlink()
        files = list(dict.fromkeys(self.weight_map.values()))
        if len(files) > 1:
            total = sum(e.nbytes for e in self.plan.entries)
            files.append(write_index(self.folder, "model", self.weight_map, total).name)
        if self.per_task is None:
            return files, []
        self.per_task.finish(self.plan.recipe.base)
        return files, [self.per_task.card_section()]


@output_format("lora")
class LoraFolder(FolderSink):
    """The merge as a PEFT LoRA adapter folder (:mod:`primerge.output.lora`); ``output.lora_rank``
    is its rank. A per-task method has no single adapter to write and is refused."""

    copies_support_files = False

    def __init__(self, out: Path, recipe: Recipe, *, force: bool = False, shard_size: int) -> None:
        if recipe.spec.per_task:
            raise RecipeError(f"method '{recipe.method}' gives every task its own model; it cannot be "
                              f"written as one LoRA adapter (drop --as-lora / output.lora_rank).")
        super().__init__(out, recipe, force=force, shard_size=shard_size)
        self.rank = recipe.output.lora_rank

    def open(self, plan: Plan, prepass: Any) -> None:
        self.export = LoraExport(self.rank, lora_task_type(plan, plan.recipe.output.lora_task_type))

    def unit_writer(self) -> LoraParts:
        return LoraParts(self.rank, self.plan.recipe.seed)

    def receive(self, unit: WorkUnit, receipt: list) -> None:
        for part in receipt:
            self.export.take(part)

    def write(self, result: MergeResult) -> tuple[list[str], list[str]]:
        files = self.export.write(self.folder, self.plan.recipe.base, self.ledger)
        result.lora = self.export.report()
        return files, [self.export.card_section()]
