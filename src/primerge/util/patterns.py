"""Regular expressions from recipes and from files, matched in bounded time.

Patterns reach primerge from the user (``matrices``, ``task_specific``, LiNeS block
patterns) and from files it did not write (``rank_pattern`` / ``alpha_pattern`` keys of an
``adapter_config.json``). Python's ``re`` can backtrack for longer than the age of the
universe on a crafted pattern and cannot be interrupted, so every such pattern goes through
:class:`Pattern`: it is compiled with the ``regex`` library (the syntax of ``re``), refused
when longer than :data:`MAX_LENGTH` characters or when nested counted repetitions such as
``((a{100}){100}){100}`` would unroll into more than :data:`MAX_UNROLL` copies (the compiler
expands them), and every match runs under ``regex``'s timeout of :data:`TIMEOUT_S` seconds.
Each failure is one error naming where the pattern came from.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import regex

from primerge.util.errors import PrimergeError, RecipeError

MAX_LENGTH = 2000
MAX_UNROLL = 10_000
TIMEOUT_S = 1.0
_COUNTED = re.compile(r"\{(\d*)(?:,(\d*))?\}")


def _quantifier(text: str, at: int) -> tuple[int, int]:
    """(upper bound of a counted repetition starting at ``text[at]``, its length); (1, 0) if none."""
    match = _COUNTED.match(text, at)
    if match is None or match.group(0) == "{}" or (match.group(1) == "" and match.group(2) is None):
        return 1, 0
    bounds = [int(g) for g in match.groups() if g]
    return (max(bounds) if bounds else 1), len(match.group(0))


def _skip_class(text: str, at: int) -> int:
    """Index just past the character class ``[...]`` opening at ``text[at]``."""
    i = at + 1
    if i < len(text) and text[i] == "^":
        i += 1
    if i < len(text) and text[i] == "]":
        i += 1
    while i < len(text) and text[i] != "]":
        i += 2 if text[i] == "\\" else 1
    return i + 1


def unroll(text: str) -> int:
    """The largest product of nested counted-repetition bounds in a pattern (1 without any)."""
    stack = [1]  # per open group: the largest unrolled size of an atom inside it
    i = 0
    while i < len(text):
        char = text[i]
        if char == "(":
            stack.append(1)
            i += 1
            continue
        if char == ")" and len(stack) > 1:
            size = stack.pop()
        else:
            size = 1
        i = _skip_class(text, i) if char == "[" else i + (2 if char == "\\" else 1)
        bound, length = _quantifier(text, i)
        i += length
        stack[-1] = max(stack[-1], size * bound)
    return max(stack)


class Pattern:
    """A compiled pattern with a bounded-time :meth:`search`; ``origin`` names where it came from."""

    def __init__(self, text: str, origin: str, error: type[PrimergeError] = RecipeError):
        self.text, self.origin, self.error = text, origin, error
        if not isinstance(text, str):
            raise error(f"{origin}: a regular expression must be text, not {type(text).__name__}.")
        if len(text) > MAX_LENGTH:
            raise error(f"{origin}: the regular expression is {len(text)} characters long; at most "
                        f"{MAX_LENGTH} are accepted.")
        if unroll(text) > MAX_UNROLL:
            raise error(f"{origin}: '{text[:80]}' nests counted repetitions ({{m,n}}) {unroll(text)} copies "
                        f"deep; at most {MAX_UNROLL} are accepted. Simplify the pattern.")
        try:
            self.compiled = regex.compile(text)
        except (regex.error, OverflowError, RecursionError, ValueError) as exc:
            raise error(f"{origin}: '{text[:80]}' is not a valid regular expression ({exc}).") from None

    @property
    def groups(self) -> int:
        return self.compiled.groups

    def _run(self, method: Callable, name: str):
        try:
            return method(name, timeout=TIMEOUT_S)
        except TimeoutError:
            raise self.error(f"{self.origin}: matching '{self.text[:80]}' against '{name[:80]}' took more than "
                             f"{TIMEOUT_S:g} s (catastrophic backtracking); simplify the pattern.") from None

    def search(self, name: str):
        """``regex.search`` of the pattern in ``name``, or the error after :data:`TIMEOUT_S` seconds."""
        return self._run(self.compiled.search, name)

    def match(self, name: str):
        """``regex.match`` of the pattern at the start of ``name`` (bounded like :meth:`search`)."""
        return self._run(self.compiled.match, name)


def checked(text: str | None, origin: str) -> str | None:
    """Validator for pattern fields: ``text`` if it would compile as a :class:`Pattern`, else
    ``ValueError`` with the reason (for pydantic models)."""
    if text is not None:
        try:
            Pattern(text, origin)
        except RecipeError as exc:
            raise ValueError(str(exc).removeprefix(f"{origin}: ")) from None
    return text


@functools.lru_cache(maxsize=256)
def compiled(text: str, origin: str) -> Pattern:
    """The :class:`Pattern` of a recipe field (``origin``), compiled once per process."""
    return Pattern(text, origin)
