"""Hugging Face Hub ids as inputs: ``org/name`` and ``org/name@revision`` read from the local cache.

A recipe may name a model by its hub id where no local path of that name exists. It resolves,
offline, to the snapshot folder in the Hugging Face cache (``HF_HUB_CACHE``, else
huggingface_hub's default), through huggingface_hub's own lookup
(``snapshot_download(..., local_files_only=True)``): the revision is a branch, tag or commit,
``main`` when none is given. Nothing is downloaded unless asked (``download=True``, the CLI's
``--download``); a model missing from the cache is one error line with the command that fetches it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from primerge.util.errors import InputError

#: ``org/name`` or ``org/name@revision`` (the hub's repository name rules, one ``/``).
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>[\w./-]{1,255}))?")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is written as a hub id (it may still be a local path: callers try that first)."""
    return HUB_ID.fullmatch(text) is not None and not text.startswith((".", "/", "~"))


def split_hub_id(text: str) -> tuple[str, str | None]:
    """(repository, revision or ``None``) of a hub id."""
    match = HUB_ID.fullmatch(text)
    return match.group("repo"), match.group("revision")


def download_command(text: str) -> str:
    """The command that puts ``text`` into the local cache."""
    repo, revision = split_hub_id(text)
    return f"huggingface-cli download {repo}" + (f" --revision {revision}" if revision else "")


def hub_cache() -> str:
    """The cache folder: ``HF_HUB_CACHE`` as set now, else huggingface_hub's default."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def hub_snapshot(text: str, *, download: bool = False) -> Path:
    """The local snapshot folder of hub id ``text``; with ``download`` fetched when missing."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - depends on the environment
        raise InputError(f"'{text}' is a Hugging Face Hub id; reading it needs huggingface_hub: "
                         f"pip install 'primerge[hf]'.") from None
    repo, revision = split_hub_id(text)
    cache = hub_cache()
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=not download))
    except LocalEntryNotFoundError:
        raise InputError(f"'{text}' is not a local path and not in the Hugging Face cache ({cache}); download it "
                         f"with: {download_command(text)} (or run with --download).") from None
    except Exception as exc:  # the hub client's network and repository errors
        raise InputError(f"'{text}': download failed ({type(exc).__name__}: {str(exc)[:200]}).") from None
