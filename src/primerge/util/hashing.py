"""SHA-256 digests of what primerge hashes: files, folders of files, tensors and state dicts.

One rule each, used by the manifest (integrity), the caches (zoos, scores, covariances,
decompositions) and the golden tests: a digest names content, never a path or a time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

_CHUNK = 1 << 20


def _update_from_file(digest, path: Path) -> None:
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    _update_from_file(digest, path)
    return digest.hexdigest()


_DIGESTS: dict[tuple, str] = {}


def _memoized(signature: tuple, compute) -> str:
    """``compute()``, remembered per process under ``signature`` (paths with their sizes and mtimes):
    a tuning run or a demo hashes the same inputs many times and reads each once. Only for inputs:
    an integrity check (``primerge verify``) must read the bytes every time."""
    if signature not in _DIGESTS:
        _DIGESTS[signature] = compute()
    return _DIGESTS[signature]


def input_sha256(path: Path) -> str:
    """:func:`file_sha256` of an input file, memoised (:func:`_memoized`)."""
    info = Path(path).stat()
    return _memoized(("file", str(Path(path).resolve()), info.st_size, info.st_mtime_ns), lambda: file_sha256(path))


def content_digest(path: Path, skip: Iterable[str] = ()) -> str:
    """SHA-256 of a file, or of a folder's files (sorted relative names and bytes), leaving out
    files named in ``skip``; a changed weight, config or vocabulary gives another digest.

    Memoised per process on every file's (name, size, mtime) (:func:`_memoized`)."""
    path, skip = Path(path), frozenset(skip)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name not in skip) if path.is_dir() else [path]
    signature = (str(path.resolve()), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))

    def compute() -> str:
        digest = hashlib.sha256()
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\x00")
            _update_from_file(digest, file)
            digest.update(b"\x01")
        return digest.hexdigest()
    return _memoized(signature, compute)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor, C-contiguous and little-endian, on the CPU."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of :func:`tensor_bytes` (dtype and shape are not part of it)."""
    return hashlib.sha256(tensor_bytes(tensor)).hexdigest()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()
