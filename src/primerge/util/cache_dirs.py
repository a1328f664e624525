"""Where primerge keeps its caches (fine-tuned zoos, covariances, benchmark inputs, scores).

One rule for every cache: an explicit folder, else ``$PRIMERGE_CACHE``, else
``$XDG_CACHE_HOME/primerge``, else ``~/.cache/primerge``.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache: str | Path | None = None) -> Path:
    """``cache``, else ``$PRIMERGE_CACHE``, else ``$XDG_CACHE_HOME/primerge``, else ~/.cache/primerge."""
    if cache is not None:
        return Path(cache).expanduser()
    if os.environ.get("PRIMERGE_CACHE"):
        return Path(os.environ["PRIMERGE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "primerge"
