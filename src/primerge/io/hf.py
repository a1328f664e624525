"""Hugging Face ``transformers`` loading from local folders (never the hub).

The one place primerge imports transformers for reading models and tokenizers, so layers that
need a model (PAVE's covariances, the evaluation suites) share it and stay independent of each
other. transformers is an optional dependency (``primerge[eval]``): a missing install is one
clear error.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from torch import nn  # noqa: E402

from primerge.util.errors import InputError  # noqa: E402


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
