"""Whether a model is of the base's architecture, from the ``config.json`` files.

Merging subtracts the base tensor by tensor name, so a checkpoint of another architecture whose
names and shapes happen to match (Mistral and Llama share both) would merge silently into nonsense.
The architecture of a folder is its config's ``model_type`` (``llama``, ``mistral``, ``bert``), or,
without one, its first ``architectures`` class with the head suffix removed (``LlamaForCausalLM`` ->
``Llama``). Classes of one ``model_type`` that differ only in their head (``BertModel`` and
``BertForSequenceClassification``: a base and its classifiers) are the same architecture. A model
of another architecture is refused with the fix; ``allow_other_architectures: true`` in the recipe
is the explicit override for the rare legitimate case (a config re-labelled after conversion). A
folder without a config, or a bare weight file, says nothing and is not refused.
"""

from __future__ import annotations

import re
from pathlib import Path

from primerge.io.quantized import read_config
from primerge.io.readers import Checkpoint
from primerge.util.errors import InputError, quoted

_HEAD_SUFFIX = re.compile(r"(For[A-Z]\w*|LMHeadModel|Model)$")


def architecture(config: dict) -> tuple[str, str] | None:
    """(the architecture compared, how the config states it) or ``None`` when it says nothing."""
    model_type = config.get("model_type")
    classes = config.get("architectures")
    first = str(classes[0]) if isinstance(classes, list) and classes else None
    if isinstance(model_type, str) and model_type:
        return model_type, f"model_type {quoted(model_type)}" + (f", {first}" if first else "")
    if first:
        return _HEAD_SUFFIX.sub("", first) or first, first
    return None


def check_architecture(base: Checkpoint, model: Checkpoint, label: str, allowed: bool) -> None:
    """Refuse ``model`` (named ``label``) when its config states another architecture than the
    base's (see the module docstring); ``allowed`` is the recipe's override."""
    if allowed:
        return
    ours, theirs = architecture(read_config(base.folder)), architecture(read_config(model.folder))
    if ours is None or theirs is None or ours[0] == theirs[0]:
        return
    config = Path(model.folder) / "config.json"
    raise InputError(f"{config}: model '{label}' is {theirs[1]}, the base is {ours[1]}; a checkpoint of "
                     f"another architecture is not a fine-tune of this base, and would merge by tensor name "
                     f"alone. Fix: merge fine-tunes of the base, or, if the two really are one architecture "
                     f"(a re-labelled config), add allow_other_architectures: true to the recipe.")
