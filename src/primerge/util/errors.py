"""One error hierarchy for primerge.

Errors are raised where they are detected, with the file and tensor named and a
fix suggested. Only :mod:`primerge.cli.main` turns them into exit codes (2).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PrimergeError(Exception):
    """Base class of every error primerge raises on purpose."""


class RecipeError(PrimergeError):
    """The recipe or the call is wrong: unknown method or parameter, bad value."""


class InputError(PrimergeError):
    """An input checkpoint is missing, unreadable, corrupt or inconsistent."""


class OutputError(PrimergeError):
    """The output location is unsafe or cannot be written."""


class ExecutionError(PrimergeError):
    """The units could not be run where they were sent (a cluster unreachable, workers lost)."""


def closest(name: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest choice, or '' if none is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""
