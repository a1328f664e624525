"""Where an output may go, and what ``--force`` may replace: one policy for every command that writes.

A :class:`Destination` is the folder a command is about to write (a merge, a LoRA adapter, an
analysis or demo report, a zoo model) together with the inputs it reads. :func:`destination`
checks it before any work starts and :func:`primerge.io.writer.atomic_folder` checks it again
just before the finished output is renamed into place:

* the path must be usable (text, no NUL byte, no over-long component: :func:`user_path`);
* it must not be, lie inside, or contain an input: the check compares *resolved* locations,
  the input folder itself and the real file behind every entry of it, so an output that would
  contain the ``blobs/`` a Hugging Face cache's ``snapshots/`` links point into is refused as
  surely as the input folder itself;
* a replacement of the path that a crash interrupted is finished first (:func:`primerge.io.publish.recover`);
* what is already there decides the rest. Nothing, or an empty folder: written. A symbolic
  link, a file or any other non-folder: refused, with or without ``--force`` (primerge never
  replaces a file). A folder with content: refused without ``--force``; with it, replaced only
  when it is recognisably an earlier primerge output of the same kind: its
  ``primerge-manifest.json`` (:mod:`primerge.io.manifest`) is readable, names the same kind,
  and lists every file in the folder, and the folder holds no links or special files. A folder
  holding anything primerge did not write is never deleted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from primerge.util.errors import InputError, OutputError, RecipeError
from primerge.io.files import kind, load_json, walk
from primerge.io.manifest import MANIFEST, manifest_files
from primerge.io.publish import recover
from primerge.io.user_paths import user_path

#: What each kind of output is called in messages.
KINDS = {"merge": "merge", "analysis": "analysis report", "demo-report": "demo report", "zoo-model": "zoo model",
         "tune-report": "tuning report"}


@dataclass(frozen=True)
class Destination:
    """An output folder, the kind of output it receives, ``--force``, and the inputs it must spare."""

    path: Path
    kind: str = "merge"
    force: bool = False
    inputs: tuple[Path, ...] = ()
    legacy: frozenset[str] = frozenset()  # file names of this kind of output from before manifests

    @property
    def label(self) -> str:
        return KINDS.get(self.kind, self.kind)

    def check(self) -> str:
        """Raise :class:`OutputError` unless the output may be written now; returns what is there:
        ``"absent"``, ``"empty"`` (an empty folder) or ``"previous"`` (an output --force replaces)."""
        check_overlap(self.path, self.inputs)
        return self.existing()

    def existing(self) -> str:
        """What is at the path now (see :meth:`check`), refusing what must not be replaced."""
        found = kind(self.path, follow=False)
        if found is None:
            return "absent"
        if found != "folder":
            what = {"file": "a file", "link": "a symbolic link"}.get(found, found)
            raise OutputError(f"output {self.path} is {what}; primerge writes a folder and never replaces "
                              f"anything else, even with --force. Choose another path.")
        listing = walk(self.path)
        if not (listing.files or listing.folders or listing.links or listing.special):
            return "empty"
        if not self.force:
            raise OutputError(f"output {self.path} exists and is not empty; use --force to replace an "
                              f"earlier primerge {self.label} there.")
        problem = _foreign(self.path, listing, self.kind, self.legacy)
        if problem:
            raise OutputError(f"output {self.path} {problem}; --force replaces only an earlier primerge "
                              f"{self.label} (recognised by its {MANIFEST}) or an empty folder. Choose "
                              f"another folder, or remove this one yourself.")
        return "previous"


def destination(out: object, inputs: Iterable[object] = (), *, force: object = False,
                kind: str = "merge", legacy: Iterable[str] = ()) -> Destination:
    """A checked :class:`Destination` for ``out`` (``--out``) that must spare ``inputs``.

    ``legacy`` names the files of this kind of output as primerge wrote it before it wrote
    manifests: a folder holding only such files is recognised as an earlier output too."""
    if not isinstance(force, bool):
        raise RecipeError(f"force must be true or false, not {force!r:.40}.")
    path = user_path(out, "output", RecipeError)
    spared = tuple(user_path(p, "input", InputError) for p in inputs)
    target = Destination(path, kind, force, spared, frozenset(legacy))
    recover(path)  # a replacement a crash interrupted is finished before anything looks at the path
    target.check()
    return target


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise OutputError(f"{path}: cannot resolve the path ({exc}).") from None


def real_locations(path: Path) -> list[Path]:
    """Where an input's files really are: the resolved input, and for a folder the resolved
    target of every entry in it (a Hugging Face snapshot's links resolve into ``blobs/``); an
    index file's neighbours (its shards) count as its files."""
    real = _resolve(path)
    folder = path if kind(path) == "folder" else (path.parent if path.name.endswith(".index.json") else None)
    if folder is None:
        return [real]
    try:
        entries = list(folder.iterdir())
    except OSError:
        entries = []
    return [real, *(_resolve(entry) for entry in entries)]


def check_overlap(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse an output that is, lies inside, or contains an input or the real files of one."""
    target = _resolve(out)
    for given in inputs:
        if kind(given) is None:
            continue  # a missing input is the reader's error to report
        real = _resolve(given)
        if target == real or (kind(given) == "folder" and real in target.parents):
            raise OutputError(f"output {out} is, or is inside, the input {given}; choose another folder.")
        for location in real_locations(given):
            if target == location or target in location.parents:
                where = "" if location == real else f" (its file {location})"
                raise OutputError(f"output {out} contains the input {given}{where}; replacing it would "
                                  f"delete the input. Choose another folder.")


def _foreign(folder: Path, listing, expected_kind: str, legacy: frozenset[str]) -> str | None:
    """Why ``folder`` is not an earlier primerge output of ``expected_kind``, or ``None`` if it is one."""
    if listing.links or listing.special:
        first = (listing.links or list(listing.special))[0]
        return f"holds a link or special file ('{first}') that primerge never writes"
    if legacy and not listing.folders and set(listing.files) <= legacy:
        return None
    if MANIFEST not in listing.files:
        return f"holds files but no {MANIFEST}, so it is not a primerge output"
    try:
        manifest = load_json(folder / MANIFEST, "manifest")
        recorded = manifest_files(manifest)
    except (InputError, ValueError) as exc:
        return f"has a {MANIFEST} that cannot be read ({str(exc)[:120]})"
    found_kind = manifest.get("kind", "merge")
    if found_kind != expected_kind:
        return f"holds a primerge {KINDS.get(found_kind, found_kind)}, not a {KINDS.get(expected_kind, expected_kind)}"
    extra = [f for f in listing.files if f != MANIFEST and f not in recorded]
    if extra:
        return f"holds {len(extra)} files primerge did not write (first: '{extra[0]}')"
    return None
