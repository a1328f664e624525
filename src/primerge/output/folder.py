"""Folder outputs: a merged model (:class:`ModelFolder`) or a PEFT LoRA adapter (:class:`LoraFolder`).

Both are written into a temporary folder beside the destination (:func:`primerge.io.writer.atomic_folder`)
and published by one rename when the merge finished; every tensor is recorded in a
:class:`~primerge.io.manifest.Ledger`, and before the rename the folder gets the task heads
(``task_heads/<model>.safetensors``), the model card (with each output's own sections) and the
manifest, checked against what was computed.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from primerge.errors import OutputError
from primerge.io.manifest import Ledger
from primerge.io.writer import ShardedWriter, atomic_folder, copy_support_files, save_tensors
from primerge.output.base import MergedTensor, MergeResult, PerTaskTensor, Sink, task_heads
from primerge.output.card import write_card
from primerge.output.lora import LoraExport
from primerge.output.per_task import PerTaskWriter
from primerge.plan import Plan
from primerge.recipe import Recipe


def check_output(out: Path, recipe: Recipe, force: bool) -> Path:
    """Refuse an output that is, or contains, or lies inside an input, or exists (without force)."""
    out = Path(out).expanduser()
    target = out.resolve()
    for path in [recipe.base, *(m.path for m in recipe.models)]:
        src = Path(path).expanduser().resolve()
        if target == src or (src.is_dir() and src in target.parents):
            raise OutputError(f"output {out} is, or is inside, the input {path}; choose another folder.")
        if target in src.parents:
            raise OutputError(
                f"output {out} contains the input {path}; replacing it would delete the input. "
                f"Choose another folder."
            )
    if out.exists() and not force and (out.is_file() or any(out.iterdir())):
        raise OutputError(f"output {out} exists and is not empty; use --force to replace it.")
    return out


class FolderSink(Sink):
    """A folder written atomically: subclasses write their files, this class the rest."""

    #: whether the base folder's support files (config, tokenizer) are copied in
    copies_support_files = True

    def __init__(self, out: Path, *, force: bool = False) -> None:
        self.out = Path(out)
        self.force = force

    @contextmanager
    def session(self, plan: Plan, prepass: Any) -> Iterator[None]:
        self.plan = plan
        with atomic_folder(self.out, force=self.force) as folder:
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
            (self.folder / "task_heads").mkdir()
            for label, tensors in heads.items():
                save_tensors(self.folder / "task_heads" / f"{label}.safetensors", tensors, ledger=self.ledger)
        copied = copy_support_files(self.plan.base.support, self.folder) if self.copies_support_files else []
        result.out = self.out
        write_card(self.folder, self.plan.recipe, result, files, heads, copied, sections)
        self.ledger.seal()


class ModelFolder(FolderSink):
    """The merged model as sharded safetensors (Hugging Face layout); a per-task method's τ_uni,
    masks and scalars beside it (:mod:`primerge.output.per_task`)."""

    def __init__(self, out: Path, *, force: bool = False, shard_size: int) -> None:
        super().__init__(out, force=force)
        self.shard_size = shard_size

    def open(self, plan: Plan, prepass: Any) -> None:
        self.model = ShardedWriter(self.folder, self.shard_size, ledger=self.ledger)
        spec = plan.recipe.spec
        self.per_task = None
        if spec.per_task:
            self.per_task = PerTaskWriter(self.folder, spec, plan.labels, prepass.task_scalars(),
                                          self.shard_size, self.ledger)

    def add(self, merged: MergedTensor) -> None:
        self.model.add(merged.name, merged.value)
        if self.per_task is not None and isinstance(merged, PerTaskTensor):
            self.per_task.add(merged)

    def write(self, result: MergeResult) -> tuple[list[str], list[str]]:
        files = [f.name for f in self.model.finish()]
        if self.per_task is None:
            return files, []
        self.per_task.finish(self.plan.recipe.base)
        return files, [self.per_task.card_section()]


class LoraFolder(FolderSink):
    """The merge as a PEFT LoRA adapter folder (:mod:`primerge.output.lora`)."""

    copies_support_files = False

    def __init__(self, out: Path, *, force: bool = False, rank: int) -> None:
        super().__init__(out, force=force)
        self.rank = rank

    def open(self, plan: Plan, prepass: Any) -> None:
        self.export = LoraExport(self.rank, plan.recipe.seed)

    def add(self, merged: MergedTensor) -> None:
        self.export.add(merged)

    def write(self, result: MergeResult) -> tuple[list[str], list[str]]:
        files = self.export.write(self.folder, self.plan.recipe.base, self.ledger)
        result.lora = self.export.report()
        return files, [self.export.card_section()]
