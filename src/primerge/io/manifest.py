"""Output integrity: a manifest of every written file and tensor, checked after writing.

While an output folder is written, every tensor handed to a writer is hashed
from memory (SHA-256 of its raw bytes) together with its name, shape and dtype
(:class:`Ledger`). :meth:`Ledger.seal` then re-opens every safetensors file the
output holds and checks that it contains exactly the recorded tensors, each
with the recorded shape, dtype and hash (so a corrupted or truncated write is
caught before the folder is renamed into place), hashes every other file, and
writes ``primerge-manifest.json``::

    {"format": 1, "kind": "merge",
     "files": {"model.safetensors": {"size": 123, "tensors": {name: {"shape": [..],
                                      "dtype": "bfloat16", "sha256": "..."}}},
               "config.json": {"size": 456, "sha256": "..."}, ...}}

:func:`verify_folder` (``primerge verify OUTDIR``) repeats the check on any
earlier output from the manifest alone: missing, extra, resized or altered
files and tensors, non-finite values, links and special files are reported one per
line. The model card (``README.md`` of a merge) is listed as ``{"card": true}``: it must be
there, as a regular file, but its text is not hashed. It records where and how the merge ran
(local or Ray, machine kind), which may differ between runs that write the same bytes, and people
edit cards before publishing; so the manifest of a merge is the same whatever ran it. The manifest itself is not trusted: every path in it must be a plain relative
path inside the folder and every entry of the expected type (:func:`manifest_files`),
and nothing is opened before it is known to be a regular file. ``kind`` says which
command wrote the folder (``merge``, ``analysis``, ``demo-report``, ``zoo-model``);
``--force`` replaces only a folder of its own kind (:mod:`primerge.io.destination`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open

from primerge.util.errors import InputError, OutputError
from primerge.io.files import kind, load_json, walk
from primerge.io.publish import recover
from primerge.util.hashing import file_sha256, tensor_sha256

MANIFEST = "primerge-manifest.json"
#: The manifest entry of a model card: present as a regular file, text not hashed.
CARD_ENTRY = {"card": True}
FORMAT_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: Files a model hub or git adds to a folder after primerge wrote it (an upload's ``.gitattributes``,
#: ``huggingface_hub``'s download metadata): reported by verify as unlisted, not as corruption.
HUB_METADATA = re.compile(r"^(\.gitattributes|\.gitignore|\.cache/huggingface/.*)$")


def tensor_record(tensor: torch.Tensor) -> dict:
    """Shape, dtype and the SHA-256 of the raw (C-contiguous, little-endian) bytes of a CPU tensor."""
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."), "sha256": tensor_sha256(tensor)}


def non_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating tensor holds NaN or ±Inf.

    From ``torch.aminmax`` (which propagates NaN, and whose extremes are ±Inf if any entry is):
    one reduction, no mask, much faster than ``isfinite(t).all()`` (docs/benchmarks.md, "Measurements
    behind design decisions"). float8 is checked through float32 (torch has no reductions for it)."""
    if not tensor.dtype.is_floating_point or tensor.numel() == 0:
        return False
    if tensor.element_size() == 1:
        tensor = tensor.float()
    low, high = torch.aminmax(tensor)
    return not (bool(torch.isfinite(low)) and bool(torch.isfinite(high)))


def _stored_tensors(path: Path) -> tuple[dict[str, dict], list[str]]:
    """Record of every tensor stored in a safetensors file, read back from disk, and the names
    of those holding NaN or Inf."""
    records, bad = {}, []
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        for name in handle.keys():
            tensor = handle.get_tensor(name)
            records[name] = tensor_record(tensor)
            if non_finite(tensor):
                bad.append(name)
    return records, bad


def _compare(rel: str, expected: dict[str, dict], stored: dict[str, dict]) -> list[str]:
    problems = [f"{rel}: tensor '{n}' is missing" for n in expected if n not in stored]
    problems += [f"{rel}: unexpected tensor '{n}'" for n in stored if n not in expected]
    for name in expected.keys() & stored.keys():
        for key in ("shape", "dtype", "sha256"):
            if expected[name].get(key) != stored[name][key]:
                problems.append(f"{rel}: tensor '{name}' {key} is {stored[name][key]}, "
                                f"expected {expected[name].get(key)}")
    return problems


def _unusual(listing) -> list[str]:
    """Problems for the links and special files of a folder listing (primerge writes neither)."""
    return ([f"{rel}: a symbolic link (primerge writes none; not followed)" for rel in listing.links]
            + [f"{rel}: {what} (primerge writes none; not opened)" for rel, what in listing.special.items()])


@dataclass
class Ledger:
    """Records what was written into an output folder, then checks and seals it.

    ``kind`` names the command that writes the folder (recorded in the manifest)."""

    folder: Path
    kind: str = "merge"
    tensors: dict[str, dict[str, dict]] = field(default_factory=dict)  # relative path -> name -> record
    card: str | None = None  # the model card's relative path: listed, not hashed (module docstring)

    def record(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        """Remember the tensors just saved to ``path`` (inside the folder)."""
        self.add(path, {name: tensor_record(t) for name, t in tensors.items()})

    def add(self, path: Path, records: dict[str, dict]) -> None:
        """Remember :func:`tensor_record` s computed elsewhere (e.g. by the worker that wrote ``path``)."""
        self.tensors[Path(path).relative_to(self.folder).as_posix()] = records

    def rename(self, old: Path, new: Path) -> None:
        """Follow a file renamed inside the folder (e.g. a shard given its final name)."""
        self.tensors[Path(new).relative_to(self.folder).as_posix()] = self.tensors.pop(
            Path(old).relative_to(self.folder).as_posix())

    def seal(self) -> Path:
        """Read every safetensors file back and compare; hash the other files; write the manifest.

        Raises :class:`OutputError` if what is on disk differs from what was computed.
        """
        files: dict[str, dict] = {}
        listing = walk(self.folder)
        problems = _unusual(listing)
        for rel in listing.files:
            if rel == MANIFEST:
                continue
            path = self.folder / rel
            if rel == self.card:
                files[rel] = dict(CARD_ENTRY)
                continue
            entry: dict = {"size": path.stat().st_size}
            if rel in self.tensors:
                stored, bad = _stored_tensors(path)
                problems += _compare(rel, self.tensors[rel], stored)
                problems += [f"{rel}: tensor '{n}' holds NaN or Inf" for n in bad]
                entry["tensors"] = self.tensors[rel]
            else:
                entry["sha256"] = file_sha256(path)
            files[rel] = entry
        problems += [f"{rel}: recorded but not written" for rel in self.tensors if rel not in files]
        if problems:
            raise OutputError(f"{self.folder}: the written output does not match what was computed: "
                              + "; ".join(problems[:5]) + ". Check the disk and try again.")
        path = self.folder / MANIFEST
        path.write_text(json.dumps({"format": FORMAT_VERSION, "kind": self.kind, "files": files}, indent=1) + "\n")
        return path


def _safe_relative(rel: object) -> bool:
    """A manifest path: plain relative POSIX text, no ``..``, ``.``, empty or absolute parts."""
    if not isinstance(rel, str) or not rel or "\0" in rel or "\\" in rel:
        return False
    parts = PurePosixPath(rel).parts
    return not rel.startswith("/") and all(p not in ("", ".", "..") for p in parts) and "/".join(parts) == rel


def _valid_entry(entry: object) -> bool:
    if entry == CARD_ENTRY:
        return True
    if not isinstance(entry, dict) or type(entry.get("size")) is not int or entry["size"] < 0:
        return False
    if "tensors" in entry:
        tensors = entry["tensors"]
        return isinstance(tensors, dict) and all(
            isinstance(t, dict) and isinstance(t.get("shape"), list) and isinstance(t.get("dtype"), str)
            and isinstance(t.get("sha256"), str) for t in tensors.values())
    return isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"]) is not None


def manifest_files(manifest: object) -> dict[str, dict]:
    """The ``files`` of a parsed manifest; ``ValueError`` if its structure is not a manifest's."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"unsupported manifest format {found!r:.40}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ValueError("'files' is not an object")
    if not isinstance(manifest.get("kind", "merge"), str):
        raise ValueError("'kind' is not text")
    return files


def entry_problems(rel: object, entry: object) -> list[str]:
    """Why a manifest entry cannot be checked (an unsafe path or a malformed record), if it cannot."""
    if not _safe_relative(rel):
        return [f"{str(rel)[:120]!r}: the manifest names something other than a plain relative path inside "
                f"the folder; not opened"]
    if not _valid_entry(entry):
        return [f"{rel}: the manifest entry is malformed (expected size and sha256 or tensors)"]
    return []


@dataclass
class Verification:
    """Outcome of :func:`verify_folder`: files and tensors checked, and every problem found."""

    folder: Path
    files: int = 0
    tensors: int = 0
    problems: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)  # hub metadata files added after the merge
    recovered: str | None = None  # an interrupted replacement of the folder, finished first

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_manifest(folder: Path) -> dict[str, dict]:
    found = kind(folder)
    if found != "folder":
        raise InputError(f"{folder}: no such folder." if found is None else f"{folder}: not a folder.")
    path = folder / MANIFEST
    if kind(path, follow=False) is None:
        raise InputError(f"{folder}: no {MANIFEST}; is it a primerge output folder "
                         f"(written by primerge 0.1 or later)?")
    if kind(path, follow=False) == "link":
        raise InputError(f"{path}: a symbolic link; primerge writes its manifest as a plain file.")
    try:
        return manifest_files(load_json(path, "manifest"))
    except ValueError as exc:
        raise InputError(f"{path}: not a readable manifest ({exc}).") from None


def _check_file(folder: Path, rel: str, entry: dict, result: Verification) -> None:
    path = folder / rel
    found = kind(path, follow=False)
    if found != "file":
        result.problems.append(f"{rel}: missing" if found is None else
                               f"{rel}: {'a symbolic link' if found == 'link' else found}, not a file")
        return
    result.files += 1
    if entry == CARD_ENTRY:
        return
    size = path.stat().st_size
    if size != entry["size"]:
        result.problems.append(f"{rel}: size {size}, expected {entry['size']}")
    if "tensors" in entry:
        try:
            stored, bad = _stored_tensors(path)
        except (SafetensorError, OSError) as exc:
            result.problems.append(f"{rel}: not a readable safetensors file ({exc})")
            return
        result.tensors += len(stored)
        result.problems += _compare(rel, entry["tensors"], stored)
        result.problems += [f"{rel}: tensor '{n}' holds NaN or Inf" for n in bad]
    elif file_sha256(path) != entry["sha256"]:
        result.problems.append(f"{rel}: contents changed (SHA-256 differs)")


def verify_folder(folder: str | Path) -> Verification:
    """Check an output folder against its ``primerge-manifest.json``.

    Every listed file must be a regular file with the listed size; safetensors files must
    hold exactly the listed tensors with the listed shape, dtype and SHA-256 and no NaN or
    Inf; other files must match their SHA-256. Files not in the manifest, links, special
    files, an empty file list and malformed or escaping manifest entries are reported. A
    replacement of the folder that a crash interrupted is finished first
    (:func:`primerge.io.publish.recover`).
    Raises :class:`InputError` when there is no readable manifest.
    """
    folder = Path(folder)
    recovered = recover(folder)  # a replacement a crash interrupted: finished (or rolled back) first
    files = _read_manifest(folder)
    result = Verification(folder, recovered=recovered)
    if not files:
        result.problems.append(f"{MANIFEST}: lists no files, so nothing can be verified")
    listing = walk(folder)
    for rel, entry in files.items():
        problems = entry_problems(rel, entry)
        result.problems += problems
        if not problems:
            _check_file(folder, rel, entry, result)
    result.problems += _unusual(listing)
    extra = [rel for rel in listing.files if rel not in files and rel != MANIFEST]
    result.unlisted = [rel for rel in extra if HUB_METADATA.match(rel)]
    result.problems += [f"{rel}: not listed in the manifest" for rel in extra if rel not in result.unlisted]
    return result
