"""Task-specific tensors (classification heads) beside a merged body, and the model that runs them.

A recipe's ``task_specific`` tensors are not merged: each model's own are written to
``task_heads/<model>.safetensors`` under its own names (``<model>`` is the model's name encoded as a
safe file name, :func:`primerge.io.user_paths.component`), with ``task_heads/<model>.json`` recording
the fine-tune's ``architectures`` (from its ``config.json``, when it has one) and the tensor names.
:func:`load_task_model` puts one task back together: the merged body with that task's head, as
the transformers class the fine-tune was (e.g. ``BertForSequenceClassification``), ``num_labels``
from the head's shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from primerge.util.errors import InputError
from primerge.io.files import load_json
from primerge.io.manifest import Ledger
from primerge.io.user_paths import component, components
from primerge.io.readers import open_checkpoint
from primerge.io.writer import save_tensors

FOLDER = "task_heads"
#: Head tensor names -> the model class suffix when a fine-tune recorded no architecture.
HEAD_CLASSES = {"classifier": "ForSequenceClassification", "score": "ForSequenceClassification",
                "qa_outputs": "ForQuestionAnswering"}


def write_heads(folder: Path, heads: dict[str, dict[str, Tensor]], architectures: dict[str, list[str] | None],
                ledger: Ledger) -> None:
    """``task_heads/<model>.safetensors`` and ``.json`` for every model that has task-specific tensors."""
    (folder / FOLDER).mkdir()
    names = components(heads)  # labels are user text: encoded into safe file names
    for label, tensors in heads.items():
        save_tensors(folder / FOLDER / f"{names[label]}.safetensors", tensors, ledger=ledger)
        meta = {"architectures": architectures.get(label), "tensors": sorted(tensors)}
        (folder / FOLDER / f"{names[label]}.json").write_text(json.dumps(meta, indent=2) + "\n")


def _model_class(transformers, meta: dict, heads: dict[str, Tensor], body: str):
    """The fine-tune's recorded class (a class with a head, not the body's), else
    ``<Body class prefix><suffix by head name>``."""
    for name in meta.get("architectures") or []:
        if name != body and hasattr(transformers, name):
            return getattr(transformers, name)
    prefix = body.removesuffix("Model")
    for head, suffix in HEAD_CLASSES.items():
        if any(n.split(".")[0] == head for n in heads) and hasattr(transformers, prefix + suffix):
            return getattr(transformers, prefix + suffix)
    raise InputError(f"cannot tell which model class runs the head tensors {sorted(heads)}; pass model_class=.")


def load_task_model(folder: str | Path, task: str, *, model_class: Any = None, **kwargs: Any):
    """The merged body in ``folder`` with task ``task``'s own head, as a transformers model.

    ``model_class`` overrides the class (default: the one the fine-tune was, see the module
    docstring); ``kwargs`` go to its ``from_pretrained``. ``num_labels`` is the head's row count.
    """
    from primerge.io.hf import transformers_module

    folder = Path(folder)
    meta_file = folder / FOLDER / f"{component(task, 'task')}.json"
    if not meta_file.is_file():
        tasks = sorted(p.stem for p in (folder / FOLDER).glob("*.json")) if (folder / FOLDER).is_dir() else []
        raise InputError(f"{folder}: no task head '{task}' (tasks with heads: {', '.join(tasks) or 'none'}).")
    meta = load_json(meta_file, "task head description")
    if not isinstance(meta, dict):
        raise InputError(f"{meta_file}: not a task head description (a JSON object).")
    store = open_checkpoint(folder / FOLDER / f"{component(task, 'task')}.safetensors")
    heads = {name: store.load(name) for name in store.names}
    transformers = transformers_module()
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    body = (config.architectures or [type(config).__name__.removesuffix("Config") + "Model"])[0]
    cls = model_class or _model_class(transformers, meta, heads, body)
    weight = next((t for n, t in heads.items() if n.endswith("weight") and t.dim() == 2), None)
    if weight is not None:
        config.num_labels = weight.shape[0]
    model = cls.from_pretrained(str(folder), config=config, local_files_only=True, **kwargs)
    missing = [n for n in heads if n not in model.state_dict()]
    if missing:
        raise InputError(f"{cls.__name__} has no tensors {missing} of the head '{task}'; pass model_class=.")
    model.load_state_dict(heads, strict=False)
    return model
