"""What a path really is, before anything opens it, and every file read whole read within bounds.

``open()`` on a FIFO blocks until a writer appears and on a device reads forever, so every file
primerge reads from a model folder or an output (weights, shards, indexes, configs, tokenizer
files, manifests) is first checked to be a regular file (:func:`regular_file`); a folder or
special file where a file is expected is one :class:`~primerge.util.errors.InputError`.

Every file read whole (recipes, JSON configs, indexes, manifests, tokenizers, task tables) goes
through one reader, :func:`read_bounded`: it opens without blocking (``O_NONBLOCK``), checks on the
open descriptor that it holds a regular file (so a FIFO or device swapped in after the check is
refused too), and reads at most the limit of that kind of file (:data:`LIMITS`), refusing a larger
one, so a tiny input can never make primerge read or allocate without bound. On top of it:

* :func:`load_json` / :func:`parse_json`: malformed text and nesting deep enough to exhaust
  Python's recursion limit are one error naming the file;
* :func:`load_yaml` / :func:`parse_yaml`: YAML's aliases (``*name``) let a few hundred bytes
  stand for an exponentially large document (an "alias bomb"); the composed document is measured
  as its aliases expand (each node counted once per reference, shared nodes memoised, so the
  measurement itself is linear in the text) and refused above :data:`MAX_YAML_NODES` values, or
  when an alias refers to the node that contains it (a cycle), before anything is constructed.

:func:`walk` lists a folder without following links and names every entry that is not a plain
file or folder.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import yaml

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


#: The most bytes primerge reads of each kind of file it reads whole (see the module docstring):
#: far above any real one (a 1T-parameter model's shard index is ~10 MB, the largest tokenizer.json
#: files ~40 MB), far below what could exhaust a machine.
LIMITS = {"recipe": 4 * 2**20, "json": 64 * 2**20, "tokenizer": 512 * 2**20, "table": 256 * 2**20}
#: Values a YAML document may hold once its aliases are expanded.
MAX_YAML_NODES = 100_000


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f} MiB" if nbytes >= 2**20 else f"{nbytes} bytes"


def open_regular(path: Path, what: str = "file", error: type[PrimergeError] = InputError) -> BinaryIO:
    """``path`` opened for binary reading, refused (``error``) unless the opened descriptor is a
    regular file: opened with ``O_NONBLOCK``, so a FIFO or device never blocks the check."""
    regular_file(path, what, error)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"{path}: cannot open the {what} ({exc.strerror or exc}).") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced by a special file since the check
        os.close(fd)
        regular_file(path, what, error)
        raise error(f"{path}: not a regular file; refusing to read it.")
    return os.fdopen(fd, "rb")


def read_bounded(path: Path, what: str = "file", limit: str = "json",
                 error: type[PrimergeError] = InputError) -> bytes:
    """The bytes of the regular file ``path``, at most ``LIMITS[limit]`` of them: a special file,
    an unreadable file or a larger one is ``error`` naming the file (see the module docstring)."""
    most = LIMITS[limit]
    with open_regular(path, what, error) as handle:
        try:
            data = handle.read(most + 1)
        except OSError as exc:
            raise error(f"{path}: cannot read the {what} ({exc.strerror or exc}).") from None
    if len(data) > most:
        raise error(f"{path}: the {what} is larger than {_mib(most)}, more than any real one; "
                    f"refusing to read it. Check that this is the right file.")
    return data


def parse_json(data: bytes | str, where: object, what: str = "JSON file",
               error: type[PrimergeError] = InputError, **options: Any) -> Any:
    """JSON text parsed; malformed text or nesting too deep is ``error`` naming ``where``.
    ``options`` go to :func:`json.loads` (e.g. ``object_pairs_hook``)."""
    try:
        return json.loads(data, **options)
    except RecursionError:
        raise error(f"{where}: the {what} is nested too deeply to be a real one; re-download or repair it.") from None
    except ValueError as exc:
        raise error(f"{where}: is not valid JSON ({str(exc)[:200]}). Re-download or repair the {what}.") from None


def load_json(path: Path, what: str = "JSON file", error: type[PrimergeError] = InputError,
              **options: Any) -> Any:
    """Parse a regular JSON file read by :func:`read_bounded`; every failure (special file,
    unreadable, too large, not UTF-8, not JSON, nested too deeply) is ``error`` naming the file."""
    return parse_json(read_bounded(path, what, "json", error), path, what, error, **options)


def parse_yaml(text: str, where: object, what: str = "YAML file", error: type[PrimergeError] = InputError) -> Any:
    """YAML text (safe tags only) as Python values, refused when its aliases expand beyond
    :data:`MAX_YAML_NODES` values or form a cycle (see the module docstring)."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_expansion(node, where, what, error)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: e.g. an integer of 5000 digits
        raise error(f"{where}: not valid YAML ({str(exc)[:200]}).") from None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expansion(root: yaml.Node, where: object, what: str, error: type[PrimergeError]) -> None:
    """Refuse a composed YAML document whose expanded size (nodes, counted once per reference)
    exceeds :data:`MAX_YAML_NODES` or whose aliases form a cycle. Iterative, memoised per node."""
    sizes: dict[int, int] = {}
    pending: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while pending:
        node, children_done = pending.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > MAX_YAML_NODES:
                raise error(f"{where}: the {what} expands to more than {MAX_YAML_NODES:,} values through its "
                            f"aliases (*name); write the values out, or remove the aliases.")
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise error(f"{where}: the {what} has an alias (*name) inside the value it names, so it never ends; "
                        f"remove that alias.")
        open_nodes.add(key)
        pending.append((node, True))
        pending.extend((child, False) for child in _children(node) if id(child) not in sizes)


def load_yaml(path: Path, what: str = "YAML file", limit: str = "recipe",
              error: type[PrimergeError] = InputError) -> Any:
    """A YAML file read by :func:`read_bounded` and parsed by :func:`parse_yaml`."""
    data = read_bounded(path, what, limit, error)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: the {what} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    return parse_yaml(text, path, what, error)


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
