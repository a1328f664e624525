"""Hugging Face ``transformers`` loading from local folders (never the hub).

The one place primerge imports transformers for reading models and tokenizers, so layers that
need a model (PAVE's covariances, RegMean's calibration pass, the evaluation suites) share it and
stay independent of each other. transformers is an optional dependency (``primerge[eval]``), peft
too (``primerge[llm]``, for applying a LoRA adapter): a missing install is one clear error.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from torch import nn  # noqa: E402

from primerge.io.adapters import CONFIG_NAME  # noqa: E402
from primerge.io.files import load_json  # noqa: E402
from primerge.util.errors import InputError  # noqa: E402

#: peft's ``task_type`` -> the transformers class an adapter of that type was trained on (its keys
#: name that class's modules); an adapter without one was trained on the bare model (``AutoModel``).
ADAPTER_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification", "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "FEATURE_EXTRACTION": "AutoModel",
}
#: The start of peft's warning that some adapter weights fit no module of the model (not loaded).
PEFT_MISSING_KEYS = "Found missing adapter keys"


def transformers_module():
    """The ``transformers`` module with its logging and progress bars quietened."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InputError("this needs transformers: pip install 'primerge[eval]'") from exc
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_tokenizer(folder: Path):
    """The folder's tokenizer (fast when available), from local files only."""
    try:
        return transformers_module().AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}: cannot load a tokenizer ({exc}).") from exc


def load_pretrained_body(folder: Path) -> nn.Module:
    """A Hugging Face encoder folder as an ``AutoModel`` in float32 (any weight format)."""
    try:
        body = transformers_module().AutoModel.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}: cannot load a Hugging Face encoder ({exc}).") from exc
    return body.float()


def apply_adapter(model: nn.Module, folder: Path) -> nn.Module:
    """``model`` with the PEFT LoRA adapter of ``folder`` merged into its weights (peft's
    ``merge_and_unload``: W + s·B A), in eval mode. peft only warns when adapter weights fit no
    module of ``model`` (they are then not applied); here that is an error naming the folder."""
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise InputError("loading a LoRA adapter needs peft: pip install 'primerge[llm]'") from exc
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            adapted = PeftModel.from_pretrained(model, str(folder)).merge_and_unload().eval()
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise InputError(f"{folder}: cannot apply this adapter to its base ({exc}).") from exc
    for warning in caught:
        if str(warning.message).startswith(PEFT_MISSING_KEYS):
            raise InputError(f"{folder}: some of the adapter's weights fit no module of the {type(model).__name__} "
                             f"built from its base ({str(warning.message)[:160]}); was it trained on this base, "
                             "and does its task_type name the model class it was trained on?")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return adapted


def adapter_model_class(adapter: Path, base: Path):
    """The transformers class an adapter's keys name modules of: the one its peft ``task_type``
    names (:data:`ADAPTER_CLASSES`); without one (peft's default), the base folder's own
    ``architectures`` class (the model a user loads from that folder and trains), else ``AutoModel``."""
    transformers = transformers_module()
    config = load_json(Path(adapter) / CONFIG_NAME, "adapter config")
    task_type = config.get("task_type") if isinstance(config, dict) else None
    if task_type is not None:
        if task_type not in ADAPTER_CLASSES:
            raise InputError(f"{adapter}: task_type {task_type!r} of {CONFIG_NAME} is not one of "
                             f"{', '.join(ADAPTER_CLASSES)}; primerge cannot tell which model class it adapts.")
        return getattr(transformers, ADAPTER_CLASSES[task_type])
    base_config = load_json(Path(base) / "config.json", "model config")
    names = base_config.get("architectures") if isinstance(base_config, dict) else None
    named = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else ""
    found = getattr(transformers, named, None) if named.isidentifier() else None
    return found or transformers.AutoModel


def load_adapted_body(adapter: Path, base: Path) -> nn.Module:
    """The model of the base folder ``base`` with the LoRA adapter of ``adapter`` applied
    (:func:`apply_adapter`), in float32: built as :func:`adapter_model_class`, so the adapter's
    keys fit (else the error of :func:`apply_adapter`), and returned as that model's body
    (transformers' ``base_model``, the model without its head), whose modules are named as
    :func:`load_pretrained_body`'s of a full fine-tune's folder."""
    cls = adapter_model_class(adapter, base)
    try:
        model = cls.from_pretrained(str(base), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"{base}: cannot load the base of the adapter {adapter} as {cls.__name__} ({exc}).") from exc
    return apply_adapter(model.float(), Path(adapter)).base_model
