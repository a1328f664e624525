"""What a path really is, before anything opens it, and JSON files read defensively.

``open()`` on a FIFO blocks until a writer appears and on a device reads forever, so every file
primerge reads from a model folder or an output (weights, shards, indexes, configs, tokenizer
files, manifests) is first checked to be a regular file (:func:`regular_file`); a folder or
special file where a file is expected is one :class:`~primerge.util.errors.InputError`. JSON files
go through :func:`load_json`, which also turns malformed text and nesting deep enough to
exhaust Python's recursion limit into that error. :func:`walk` lists a folder without
following links and names every entry that is not a plain file or folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from primerge.util.errors import InputError, PrimergeError

_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
            (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def kind(path: Path, follow: bool = True) -> str | None:
    """``"file"``, ``"folder"``, ``"link"`` (only with ``follow=False``), a description of a
    special file, or ``None`` when nothing is there (a dangling link included)."""
    try:
        mode = os.stat(path, follow_symlinks=follow).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise InputError(f"{path}: cannot inspect it ({exc.strerror or exc}).") from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISLNK(mode):
        return "link"
    return next((what for test, what in _SPECIAL if test(mode)), "a special file")


def regular_file(path: Path, what: str = "file", error: type[PrimergeError] = InputError) -> Path:
    """``path`` if it is (or links to) a regular file; else ``error`` saying what is there."""
    found = kind(path)
    if found == "file":
        return path
    article = "an" if what[:1] in "aeiou" else "a"
    if found is None:
        raise error(f"{path}: no such {what}.")
    if found == "folder":
        raise error(f"{path}: a folder where {article} {what} is expected; refusing to read it.")
    raise error(f"{path}: {found} where {article} {what} is expected; refusing to open it.")


def load_json(path: Path, what: str = "JSON file", error: type[PrimergeError] = InputError) -> Any:
    """Parse a regular JSON file; every failure (special file, unreadable, not UTF-8, not JSON,
    nested too deeply) is ``error`` naming the file."""
    regular_file(path, what, error)
    try:
        return json.loads(path.read_bytes())
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc}).") from None
    except RecursionError:
        raise error(f"{path}: the {what} is nested too deeply to be a real one; re-download or repair it.") from None
    except ValueError as exc:
        raise error(f"{path}: not valid JSON ({exc}). Re-download or repair the {what}.") from None


@dataclass
class Listing:
    """A folder's contents by kind, relative paths (``/``-separated), links not followed."""

    files: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    special: dict[str, str] = field(default_factory=dict)  # relative path -> what it is


def walk(folder: Path) -> Listing:
    """Every entry under ``folder`` (sorted), without following symbolic links."""
    listing = Listing()
    pending = [Path(folder)]
    while pending:
        current = pending.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as exc:
            raise InputError(f"{current}: cannot list the folder ({exc.strerror or exc}).") from None
        for entry in entries:
            rel = Path(entry.path).relative_to(folder).as_posix()
            found = kind(Path(entry.path), follow=False)
            if found == "file":
                listing.files.append(rel)
            elif found == "folder":
                listing.folders.append(rel)
                pending.append(Path(entry.path))
            elif found == "link":
                listing.links.append(rel)
            elif found is not None:
                listing.special[rel] = found
    listing.files.sort()
    listing.folders.sort()
    return listing


_DIGESTS: dict[tuple, str] = {}


def content_digest(path: Path, skip: Iterable[str] = ()) -> str:
    """SHA-256 of a file, or of a folder's files (sorted relative names and bytes), leaving out
    files named in ``skip``; a changed weight, config or vocabulary gives another digest.

    Memoised per process on every file's (name, size, mtime): a tuning run or a demo hashes the
    same models many times and reads each once."""
    path, skip = Path(path), frozenset(skip)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name not in skip) if path.is_dir() else [path]
    signature = (str(path.resolve()), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if signature not in _DIGESTS:
        digest = hashlib.sha256()
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\x00")
            with file.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            digest.update(b"\x01")
        _DIGESTS[signature] = digest.hexdigest()
    return _DIGESTS[signature]
