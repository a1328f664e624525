"""Package attributes imported on first use, so ``import primerge`` and ``primerge --help`` load no torch.

A package lists ``{public name: defining module}`` and sets ``__getattr__ = lazy_attributes(__name__,
table)`` (PEP 562): ``from primerge.analysis import analyze`` imports :mod:`primerge.analysis.report`
then, not when :mod:`primerge.analysis` itself is imported (e.g. for its CLI module).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, table: dict[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package`` that imports ``table[name]`` on first use."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(table[name]), name)

    return __getattr__
