"""One error hierarchy for primerge.

Errors are raised where they are detected, with the file and tensor named and a
fix suggested. Only :mod:`primerge.cli.main` turns them into exit codes (2).
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable


#: The longest message a primerge error carries: values it quotes are bounded where they are quoted
#: (:func:`quoted`), and this bounds what is left (tensor names from a header, many models' problems).
MESSAGE_LIMIT = 8000


class PrimergeError(Exception):
    """Base class of every error primerge raises on purpose. A message longer than
    :data:`MESSAGE_LIMIT` keeps its beginning and its end (where the fix is)."""

    def __init__(self, message: object = "", *args: object) -> None:
        text = str(message)
        if len(text) > MESSAGE_LIMIT:
            half = MESSAGE_LIMIT // 2
            text = f"{text[:half]} [... {len(text) - 2 * half} characters ...] {text[-half:]}"
        super().__init__(text, *args)


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


#: How much of a user's value a message quotes.
QUOTE_LIMIT = 200
_QUOTER = reprlib.Repr()
_QUOTER.maxlevel, _QUOTER.maxstring, _QUOTER.maxother = 3, QUOTE_LIMIT, QUOTE_LIMIT
_QUOTER.maxlist = _QUOTER.maxtuple = _QUOTER.maxdict = _QUOTER.maxset = 8


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for a message, at most ``limit`` characters, in bounded work: nested and
    long containers are elided (``reprlib``), so a huge or deeply shared value is never expanded."""
    try:
        text = _QUOTER.repr(value)
    except Exception:  # a hostile __repr__
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."
