"""Output integrity: a manifest of every written file and tensor, checked after writing.

While an output folder is written, every tensor handed to a writer is hashed
from memory (SHA-256 of its raw bytes) together with its name, shape and dtype
(:class:`Ledger`). :meth:`Ledger.seal` then re-opens every safetensors file the
output holds and checks that it contains exactly the recorded tensors, each
with the recorded shape, dtype and hash (so a corrupted or truncated write is
caught before the folder is renamed into place), hashes every other file, and
writes ``primerge-manifest.json``::

    {"format": 1,
     "files": {"model.safetensors": {"size": 123, "tensors": {name: {"shape": [..],
                                      "dtype": "bfloat16", "sha256": "..."}}},
               "config.json": {"size": 456, "sha256": "..."}, ...}}

:func:`verify_folder` (``primerge verify OUTDIR``) repeats the check on any
earlier output from the manifest alone: missing, extra, resized or altered
files and tensors are reported one per line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from primerge.errors import InputError, OutputError

MANIFEST = "primerge-manifest.json"
FORMAT_VERSION = 1
_CHUNK = 16 * 1024**2


def tensor_record(tensor: torch.Tensor) -> dict:
    """Shape, dtype and the SHA-256 of the raw (C-contiguous, little-endian) bytes of a CPU tensor."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(flat.view(torch.uint8).numpy().data if flat.numel() else b"").hexdigest()
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."), "sha256": digest}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stored_tensors(path: Path) -> dict[str, dict]:
    """Record of every tensor stored in a safetensors file, read back from disk."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {name: tensor_record(handle.get_tensor(name)) for name in handle.keys()}


def _compare(rel: str, expected: dict[str, dict], stored: dict[str, dict]) -> list[str]:
    problems = [f"{rel}: tensor '{n}' is missing" for n in expected if n not in stored]
    problems += [f"{rel}: unexpected tensor '{n}'" for n in stored if n not in expected]
    for name in expected.keys() & stored.keys():
        for key in ("shape", "dtype", "sha256"):
            if expected[name][key] != stored[name][key]:
                problems.append(f"{rel}: tensor '{name}' {key} is {stored[name][key]}, "
                                f"expected {expected[name][key]}")
    return problems


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


@dataclass
class Ledger:
    """Records what was written into an output folder, then checks and seals it."""

    folder: Path
    tensors: dict[str, dict[str, dict]] = field(default_factory=dict)  # relative path -> name -> record

    def record(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        """Remember the tensors just saved to ``path`` (inside the folder)."""
        self.add(path, {name: tensor_record(t) for name, t in tensors.items()})

    def add(self, path: Path, records: dict[str, dict]) -> None:
        """Remember :func:`tensor_record` s computed elsewhere (e.g. by the worker that wrote ``path``)."""
        self.tensors[str(Path(path).relative_to(self.folder))] = records

    def rename(self, old: Path, new: Path) -> None:
        """Follow a file renamed inside the folder (e.g. a shard given its final name)."""
        self.tensors[str(Path(new).relative_to(self.folder))] = self.tensors.pop(
            str(Path(old).relative_to(self.folder)))

    def seal(self) -> Path:
        """Read every safetensors file back and compare; hash the other files; write the manifest.

        Raises :class:`OutputError` if what is on disk differs from what was computed.
        """
        files: dict[str, dict] = {}
        problems: list[str] = []
        for rel in _files(self.folder):
            path = self.folder / rel
            entry: dict = {"size": path.stat().st_size}
            if rel in self.tensors:
                problems += _compare(rel, self.tensors[rel], _stored_tensors(path))
                entry["tensors"] = self.tensors[rel]
            else:
                entry["sha256"] = file_sha256(path)
            files[rel] = entry
        problems += [f"{rel}: recorded but not written" for rel in self.tensors if rel not in files]
        if problems:
            raise OutputError(f"{self.folder}: the written output does not match what was computed: "
                              + "; ".join(problems[:5]) + ". Check the disk and try again.")
        path = self.folder / MANIFEST
        path.write_text(json.dumps({"format": FORMAT_VERSION, "files": files}, indent=1) + "\n")
        return path


@dataclass
class Verification:
    """Outcome of :func:`verify_folder`: files and tensors checked, and every problem found."""

    folder: Path
    files: int = 0
    tensors: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_folder(folder: str | Path) -> Verification:
    """Check an output folder against its ``primerge-manifest.json``.

    Every listed file must exist with the listed size; safetensors files must hold
    exactly the listed tensors with the listed shape, dtype and SHA-256; other
    files must match their SHA-256; files not in the manifest are reported.
    Raises :class:`InputError` when there is no readable manifest.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT_VERSION or not isinstance(files, dict):
            raise ValueError(f"unsupported manifest format {manifest.get('format')!r}")
    except FileNotFoundError:
        raise InputError(f"{folder}: no {MANIFEST}; is it a primerge output folder "
                         f"(written by primerge 0.1 or later)?") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{manifest_path}: not a readable manifest ({exc}).") from None
    result = Verification(folder)
    for rel, entry in files.items():
        path = folder / rel
        if not path.is_file():
            result.problems.append(f"{rel}: missing")
            continue
        result.files += 1
        if path.stat().st_size != entry.get("size"):
            result.problems.append(f"{rel}: size {path.stat().st_size}, expected {entry.get('size')}")
        if "tensors" in entry:
            try:
                stored = _stored_tensors(path)
            except (SafetensorError, OSError) as exc:
                result.problems.append(f"{rel}: not a readable safetensors file ({exc})")
                continue
            result.tensors += len(stored)
            result.problems += _compare(rel, entry["tensors"], stored)
        elif file_sha256(path) != entry.get("sha256"):
            result.problems.append(f"{rel}: contents changed (SHA-256 differs)")
    result.problems += [f"{rel}: not listed in the manifest" for rel in _files(folder) if rel not in files]
    return result
