"""Per-task outputs of methods that give every task its own model (EMR).

Layout inside a merged folder (documented in its model card)::

    model.safetensors            θ₀ + τ_uni, the unified model (base dtype)
    per_task/per_task.json       method, task names, per-task scalars, base path, formats
    per_task/task_vector*.safetensors      τ_uni per merged tensor (base dtype)
    per_task/<task>/<key>*.safetensors     per-task tensors, e.g. ``mask``: boolean masks
                                           bit-packed with numpy.packbits (big bit order)
                                           over the flattened tensor, one uint8 vector each

``<task>`` is the task's name encoded as a safe file name (:func:`primerge.io.user_paths.component`:
``org/model`` is stored as ``org%2Fmodel``). Task t's weights are θ₀ + rebuild(τ_uni, {key: tensor_t},
scalars_t), with ``rebuild``
the method's own formula (for EMR λ_t · m_t ⊙ τ_uni); tensors the method did not merge
(non-floating buffers) are the unified model's. :func:`load_task_state` does this.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from primerge.util.errors import InputError
from primerge.io.files import load_json
from primerge.io.manifest import Ledger
from primerge.io.user_paths import component, components, user_path
from primerge.io.readers import open_checkpoint
from primerge.io.writer import ShardedWriter
from primerge.methods import get_method
from primerge.methods.base import MethodSpec

FOLDER = "per_task"
META = "per_task.json"
FORMAT_VERSION = 1


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as a uint8 vector of bits (numpy.packbits, big bit order, flattened)."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy().astype(bool)))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_mask` for a tensor of ``shape``."""
    count = int(np.prod(shape)) if shape else 1
    bits = np.unpackbits(packed.numpy(), count=count).astype(bool)
    return torch.from_numpy(bits).reshape(shape)


def _encode(key: str, tensor: torch.Tensor) -> torch.Tensor:
    return pack_mask(tensor) if tensor.dtype == torch.bool else tensor.contiguous()


class PerTaskWriter:
    """Streams τ_uni and every task's tensors into ``folder/per_task`` as they are merged."""

    def __init__(self, folder: Path, spec: MethodSpec, labels: list[str], scalars: list[dict[str, float]],
                 shard_size: int, ledger: Ledger | None = None) -> None:
        self.root = Path(folder) / FOLDER
        self.spec = spec
        self.labels = labels
        self.folders = components(labels)  # user text: encoded into safe folder names
        self.scalars = scalars
        self.shard_size = shard_size
        self.ledger = ledger
        self.root.mkdir()
        self.unified = ShardedWriter(self.root, shard_size, stem="task_vector", ledger=ledger)
        self.tasks: dict[tuple[str, str], ShardedWriter] = {}
        self.kinds: dict[str, str] = {}

    def add(self, name: str, unified: torch.Tensor, task_tensors: dict[str, torch.Tensor]) -> None:
        """τ_uni of tensor ``name`` and its per-task tensors (key -> (T, *shape))."""
        self.unified.add(name, unified)
        for key, stacked in task_tensors.items():
            self.kinds[key] = "bool-packbits" if stacked.dtype == torch.bool else str(stacked.dtype)
            for t, label in enumerate(self.labels):
                writer = self.tasks.get((label, key))
                if writer is None:
                    folder = self.root / self.folders[label]
                    folder.mkdir(exist_ok=True)
                    writer = self.tasks[(label, key)] = ShardedWriter(folder, self.shard_size, stem=key,
                                                                      ledger=self.ledger)
                writer.add(name, _encode(key, stacked[t]))

    def finish(self, base: Path) -> None:
        self.unified.finish()
        for writer in self.tasks.values():
            writer.finish()
        meta = {
            "format": FORMAT_VERSION,
            "method": self.spec.name,
            "base": str(Path(base).resolve()),
            "tasks": self.labels,
            "scalars": dict(zip(self.labels, self.scalars)),
            "tensors": self.kinds,
        }
        (self.root / META).write_text(json.dumps(meta, indent=2) + "\n")

    def card_section(self) -> str:
        """The model card's account of the per-task layout and the method's rebuild formula."""
        formula = f" For {self.spec.name} they are {self.spec.card}." if self.spec.card else ""
        return "\n".join([
            "## Per-task models",
            "",
            f"`{self.spec.name}` gives every task its own model. `model.safetensors` holds the unified "
            "model θ₀ + τ_uni; `per_task/task_vector*.safetensors` holds τ_uni, "
            "`per_task/<task>/<key>*.safetensors` each task's tensors (`<task>` percent-encoded as a file "
            "name where needed; boolean masks bit-packed with "
            "numpy.packbits, big bit order, over the flattened tensor) and `per_task/per_task.json` the "
            "task names, per-task scalars and the base path. Rebuild task t's weights with "
            f"`primerge.load_task_state(folder, task)`.{formula}",
            "",
        ])


def rebuild_task(spec: MethodSpec, base: torch.Tensor, unified: torch.Tensor,
                 task: dict[str, torch.Tensor], scalars: dict[str, float], dtype: torch.dtype) -> torch.Tensor:
    """θ₀ + rebuild(τ_uni, task tensors, scalars), computed in float32 and cast to ``dtype``."""
    update = spec.rebuild(unified.float(), task, scalars)
    return (base.float() + update).to(dtype)


def _stream_source(folder: Path, stem: str):
    for name in (f"{stem}.safetensors", f"{stem}.safetensors.index.json"):
        if (folder / name).is_file():
            return open_checkpoint(folder / name)
    raise InputError(f"{folder}: missing {stem}.safetensors; the per-task output is incomplete.")


def _read_meta(folder: Path) -> dict:
    """``per_task/per_task.json``, checked to have the fields :func:`load_task_state` reads."""
    path = folder / FOLDER / META
    try:
        meta = load_json(path, "per-task description")
    except InputError as exc:
        raise InputError(f"{folder}: not a per-task merge output ({exc}).") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("tasks"), list) and isinstance(meta.get("tensors"), dict)
            and isinstance(meta.get("scalars"), dict) and isinstance(meta.get("method"), str)):
        raise InputError(f"{path}: not a per-task merge output (tasks, tensors, scalars, method).")
    return meta


def load_task_state(folder: str | Path, task: str, base: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Rebuild task ``task``'s full state dict from a per-task merge output folder.

    ``base`` defaults to the base path recorded at merge time.
    """
    folder = user_path(folder, "per-task output folder", InputError)
    meta = _read_meta(folder)
    if task not in meta["tasks"]:
        raise InputError(f"{folder}: no task '{task}'; tasks: {', '.join(map(str, meta['tasks']))}.")
    spec = get_method(meta["method"])
    unified_model = open_checkpoint(folder)
    base_ckpt = open_checkpoint(base if base is not None else user_path(meta.get("base"), "base", InputError))
    vectors = _stream_source(folder / FOLDER, "task_vector")
    task_sources = {key: _stream_source(folder / FOLDER / component(task), component(key))
                    for key in meta["tensors"]}
    scalars = meta["scalars"][task]
    state = {}
    for name in unified_model.names:
        if name not in vectors:
            state[name] = unified_model.load(name)
            continue
        shape = vectors.info(name).shape
        tensors = {
            key: unpack_mask(src.load(name), shape) if meta["tensors"][key] == "bool-packbits" else src.load(name)
            for key, src in task_sources.items()
        }
        dtype = unified_model.info(name).dtype
        state[name] = rebuild_task(spec, base_ckpt.load(name), vectors.load(name), tensors, scalars, dtype)
    return state
