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

from primerge.util.errors import RecipeError
from primerge.io.destination import Destination, destination
from primerge.io.manifest import Ledger, tensor_record
from primerge.io.writer import atomic_folder, save_tensors, shard_name, write_index
from primerge.output.base import MergedTensor, MergeResult, PerTaskTensor, Sink, output_format, task_heads
from primerge.output.card import write_card
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
            self.folder, self.ledger = folder, Ledger(folder)
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
        write_card(self.folder, self.plan.recipe, result, files, heads, copied, sections)
        self.ledger.seal()


def write_support_files(files: tuple[OutputFile, ...], folder: Path) -> list[str]:
    """Write the plan's support files (config, tokenizer, ...) into ``folder``; their names."""
    for file in files:
        file.write(folder)
    return [file.name for file in files]


PART_MARK = ".part-"


@dataclass(frozen=True)
class ShardReceipt:
    """What a model folder's unit writer reports: the shard file written, its tensors' records
    (:func:`~primerge.io.manifest.tensor_record`), and a per-task method's (name, τ_uni, tensors)."""

    file: str
    records: dict[str, dict]
    per_task: list[tuple[str, Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class ShardFiles:
    """Writes unit i of n as the shard ``model-0000(i+1)-of-0000n.safetensors`` into ``folder``."""

    folder: Path
    units: int
    per_task: bool

    def write(self, unit: WorkUnit, tensors: Iterable[MergedTensor]) -> ShardReceipt:
        values, parts = {}, []
        for merged in tensors:
            values.update({name: tensor.contiguous() for name, tensor in merged.stored().items()})
            if self.per_task and isinstance(merged, PerTaskTensor):
                parts.append((merged.name, merged.unified, merged.task_tensors))
        name = shard_name("model", unit.index, self.units)
        part = self.folder / f".{name}{PART_MARK}{os.getpid()}"  # a worker killed mid-write leaves only this
        save_tensors(part, values, {"format": "pt"})
        os.replace(part, self.folder / name)
        return ShardReceipt(name, {k: tensor_record(v) for k, v in values.items()}, parts)


@output_format("model")
class ModelFolder(FolderSink):
    """The merged model as sharded safetensors (Hugging Face layout: one shard per work unit); a
    per-task method's τ_uni, masks and scalars beside it (:mod:`primerge.output.per_task`)."""

    def open(self, plan: Plan, prepass: Any) -> None:
        spec = plan.recipe.spec
        self.weight_map: dict[str, str] = {}
        self.per_task = None
        if spec.per_task:
            self.per_task = PerTaskWriter(self.folder, spec, plan.labels, prepass.task_scalars(),
                                          self.shard_size, self.ledger)

    def unit_writer(self) -> ShardFiles:
        return ShardFiles(self.folder, len(self.plan.units), self.per_task is not None)

    def receive(self, unit: WorkUnit, receipt: ShardReceipt) -> None:
        self.ledger.add(self.folder / receipt.file, receipt.records)
        self.weight_map.update(dict.fromkeys(receipt.records, receipt.file))
        for name, unified, tensors in receipt.per_task:
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
