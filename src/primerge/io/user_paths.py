"""User text that becomes a path: validated paths and encoded file-name components.

Two kinds of user text reach the file system:

* **paths** the user names (recipe ``base`` / ``models``, ``--out``, a recipe file):
  :func:`user_path` accepts text or ``os.PathLike`` only and refuses what the operating
  system would reject with an exception rather than an answer (a NUL byte, a component
  longer than :data:`NAME_MAX` bytes, a path longer than :data:`PATH_MAX` bytes), so such a
  path is one clear error, never a traceback;
* **names** that primerge turns into a file or folder name inside its output (a model's
  ``name:`` or label in ``task_heads/<label>.safetensors`` and ``per_task/<label>/``):
  :func:`component` encodes them so the result is always a single plain component that
  stays in its folder. Characters outside ``A-Z a-z 0-9 - _ . + = @ ,`` become ``%XX``
  (UTF-8 bytes, as in URLs: ``org/model`` -> ``org%2Fmodel``, ``../x`` -> ``..%2Fx``), a
  leading ``.`` becomes ``%2E`` (no hidden files, never ``.`` or ``..``), and a result longer
  than :data:`MAX_COMPONENT` bytes keeps its first part plus ``~`` and 16 hex digits of the
  text's SHA-256. The encoding is deterministic and injective (``%`` and ``~`` are always
  encoded in the text, so they cannot come from it), so writers and readers agree on it.
"""

from __future__ import annotations

import hashlib
import os
import string
from collections.abc import Iterable
from pathlib import Path

from primerge.util.errors import PrimergeError, RecipeError

#: Characters kept as they are in an encoded component.
SAFE = frozenset(string.ascii_letters + string.digits + "-_.+=@,")
#: Longest file-name component most file systems accept (bytes).
NAME_MAX = 255
#: Longest path Linux accepts (bytes).
PATH_MAX = 4096
#: Longest encoded component, leaving room for suffixes such as ``-00001-of-00002.safetensors``.
MAX_COMPONENT = 160
_HASHED = 16


def _percent(char: str) -> str:
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))


def component(text: str, what: str = "name") -> str:
    """``text`` as one safe file-name component (see the module docstring for the encoding)."""
    if not isinstance(text, str) or not text:
        raise RecipeError(f"{what} {text!r} cannot name a file: it must be non-empty text.")
    encoded = "".join(ch if ch in SAFE else _percent(ch) for ch in text)
    if encoded.startswith("."):
        encoded = "%2E" + encoded[1:]
    if len(encoded) > MAX_COMPONENT:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_HASHED]
        encoded = f"{encoded[:MAX_COMPONENT - _HASHED - 1]}~{digest}"
    return encoded


def components(names: Iterable[str], what: str = "model name") -> dict[str, str]:
    """:func:`component` of each name, refused when two would be the same file on a
    case-insensitive file system (macOS, Windows)."""
    encoded: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in names:
        encoded[name] = component(name, what)
        other = seen.setdefault(encoded[name].casefold(), name)
        if other != name:
            raise RecipeError(f"{what}s '{other}' and '{name}' differ only in letter case, so their files "
                              f"would collide on case-insensitive file systems; give one another name "
                              f"(name: in the recipe).")
    return encoded


def user_path(value: object, what: str, error: type[PrimergeError] = RecipeError) -> Path:
    """``value`` (text or ``os.PathLike``) as an expanded :class:`Path`, or ``error`` naming
    ``what`` when no file system could hold it (wrong type, empty, NUL byte, too long)."""
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else value
    if not isinstance(text, str):
        raise error(f"{what} must be a path given as text, not {type(value).__name__} ({value!r:.60}).")
    if not text:
        raise error(f"{what} is an empty path.")
    if "\0" in text:
        raise error(f"{what} {text!r:.200} contains a NUL byte, which no file name can hold.")
    try:
        path = Path(text).expanduser()
    except RuntimeError as exc:  # '~user' of an unknown user, or no home folder
        raise error(f"{what} {text!r:.200}: {exc}.") from None
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise error(f"{what} {text!r:.80}...: a component is {len(os.fsencode(part))} bytes long; "
                        f"file systems allow at most {NAME_MAX}.")
    if len(os.fsencode(str(path))) > PATH_MAX:
        raise error(f"{what} {text!r:.80}... is longer than {PATH_MAX} bytes.")
    return path
