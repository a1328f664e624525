"""Streaming, atomic output.

:func:`atomic_folder` yields a temporary folder beside the destination and
renames it into place only when the body of the ``with`` finished without an
error; on any error or interrupt the temporary folder is removed and the
destination is left as it was, and parent folders the write created are removed
again. What may be written where, and what ``--force`` may replace, is the
:class:`~primerge.io.destination.Destination` policy, checked before the work and
again just before the rename. :class:`ShardedWriter` streams tensors into
safetensors shards (``model.safetensors``, or ``model-0000i-of-0000N.safetensors``
plus ``model.safetensors.index.json`` above the shard size), holding at most one
shard in memory.

Every tensor primerge writes goes through :func:`save_tensors`, which refuses a
floating tensor holding NaN or Inf *as it will be stored*: after the cast to its
storage dtype, so an fp16/bf16 overflow of a merged, copied or per-task tensor, a
task head or a LoRA factor is an error, never a file. :func:`join_files` joins files so written
(the parts of a shard that several workers merged) into one, byte for byte the file one
:func:`save_tensors` call would have written.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from primerge.util.errors import OutputError, RecipeError
from primerge.io.destination import Destination, check_overlap
from primerge.io.publish import TEMP_MARK, move_into_place, recover
from primerge.io.user_paths import user_path
from primerge.io.manifest import Ledger, non_finite

DEFAULT_SHARD_SIZE = 2 * 1024**3
LOCK_SUFFIX = ".lock"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: The mode of every written weight file: what ``open()`` gives any other file of the output
#: (0666 less the umask), not the 0600 of safetensors' temporary file.
PUBLISHED_MODE = 0o666 & ~_umask()


def parse_size(text: str | int) -> int:
    """Bytes (at least 1) from ``2GB``, ``500MB``, ``64KiB``, ``1.5GB`` or an integer."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    elif isinstance(text, str):
        s = text.strip().upper().replace(" ", "")
        number = s.rstrip("KMGTIB")
        try:
            value = float(number) * _UNITS[s[len(number):]]
        except (ValueError, KeyError):
            raise RecipeError(f"cannot read the size '{text[:40]}'; write e.g. 2GB or 500MB.") from None
        if not math.isfinite(value):
            raise RecipeError(f"the size '{text[:40]}' is not a finite number of bytes; write e.g. 2GB.")
        size = int(value)
    else:
        raise RecipeError(f"a size must be a whole number of bytes or text such as '2GB', not "
                          f"{type(text).__name__} ({text!r:.40}).")
    if size < 1:
        raise RecipeError(f"the size '{text}' is less than one byte; write e.g. 2GB or 500MB.")
    return size


def make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, deepest first."""
    missing = []
    for parent in [folder, *folder.parents]:
        if os.path.lexists(parent):
            break
        missing.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def remove_created(created: list[Path]) -> None:
    """Remove the folders :func:`make_parents` created, where they are (still) empty."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (someone else wrote there) or already gone: stop climbing


@contextmanager
def _locked_temp(destination: Path) -> Iterator[Path]:
    """A new temporary folder beside ``destination``, held by an exclusive lock on its lock file.

    The lock (``flock``) lasts as long as this process holds the file open, so other processes
    (:func:`_remove_stale`), in any PID namespace, can tell a live write from a dead one.
    """
    temp = destination.parent / f".{destination.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    lock_path = temp.with_name(temp.name + LOCK_SUFFIX)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            temp.mkdir()
            yield temp
        finally:
            shutil.rmtree(temp, ignore_errors=True)
            lock_path.unlink(missing_ok=True)


def _publish(temp: Path, target: Destination) -> None:
    """Move ``temp`` to the destination, replacing what the policy allows (checked again now), crash-safe
    (:func:`primerge.io.publish.move_into_place`)."""
    target.check()
    move_into_place(temp, target.path, temp.with_name(temp.name + LOCK_SUFFIX))


@contextmanager
def atomic_folder(target: Destination) -> Iterator[Path]:
    """Yield a fresh temporary folder that becomes ``target.path`` on success.

    An existing output is replaced only as :class:`Destination` allows (``--force`` over an
    earlier primerge output of the same kind, or an empty folder) and only after the new
    output is complete, by an atomic exchange of the two folders or a journaled replacement
    (:mod:`primerge.io.publish`). A replacement a crash interrupted is finished first, then
    temporary folders of the same destination whose writer no longer holds its lock (killed
    with SIGKILL, power loss) are removed. On failure the parent folders this call created
    are removed again.
    """
    destination = target.path
    try:
        created = make_parents(destination.parent)
    except OSError as exc:
        raise OutputError(f"{destination}: cannot create the output folder ({exc.strerror or exc}); "
                          f"check the path and permissions.") from None
    try:
        recover(destination)  # before the stale folders go: a journal may name one as the new output
        _remove_stale(destination)
        with _locked_temp(destination) as temp:
            yield temp
            _publish(temp, target)
    except OSError as exc:
        remove_created(created)
        raise OutputError(f"{destination}: writing the output failed ({exc.strerror or exc}); nothing was "
                          f"left in place. Check free space and permissions.") from None
    except BaseException:
        remove_created(created)
        raise


def make_scratch(parent: object | None, prefix: str, inputs: list[Path]) -> tuple[Path, list[Path]]:
    """A fresh work folder ``<parent>/<prefix>XXXX`` (``parent`` defaults to the system's temporary
    folder), never an input, inside one or holding one's files; returns it and the parent folders
    created for it, for :func:`remove_scratch`."""
    root = Path(tempfile.gettempdir()) if parent is None else user_path(parent, "work folder")
    check_overlap(root / prefix, [user_path(p, "input") for p in inputs])
    try:
        created = make_parents(root)
    except OSError as exc:
        raise OutputError(f"{root}: cannot create the work folder ({exc.strerror or exc}).") from None
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=root)), created
    except OSError as exc:
        remove_created(created)
        raise OutputError(f"{root}: cannot create a work folder in it ({exc.strerror or exc}).") from None


def remove_scratch(folder: Path, created: list[Path]) -> None:
    """Delete a :func:`make_scratch` folder and the parents made for it (where empty)."""
    shutil.rmtree(folder, ignore_errors=True)
    remove_created(created)


def _remove_stale(destination: Path) -> None:
    """Delete ``destination``'s temporary folders whose writer has died.

    A writer holds ``flock`` on ``<temp>.lock`` while it runs; a lock that can be taken
    means the writer is gone. Folders without a lock file (written by primerge before
    lock files) are removed only when the process id in their name runs no process.
    """
    pattern = f".{glob.escape(destination.name)}{TEMP_MARK}*"
    for stale in destination.parent.glob(pattern):
        if stale.name.endswith(LOCK_SUFFIX):
            _remove_if_unlocked(stale)
        elif not stale.with_name(stale.name + LOCK_SUFFIX).exists() and _dead_pid(stale, destination):
            shutil.rmtree(stale, ignore_errors=True)


def _remove_if_unlocked(lock_path: Path) -> None:
    try:
        handle = open(lock_path, "r+")
    except OSError:
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return  # a live writer holds it
            raise
        shutil.rmtree(lock_path.with_name(lock_path.name.removesuffix(LOCK_SUFFIX)), ignore_errors=True)
        lock_path.unlink(missing_ok=True)


def _dead_pid(stale: Path, destination: Path) -> bool:
    pid = stale.name[len(destination.name) + 1 + len(TEMP_MARK):].split("-")[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse a floating tensor holding NaN or Inf in its stored dtype (``where``: the file or result)."""
    for name, tensor in tensors.items():
        if non_finite(tensor):
            dtype = str(tensor.dtype).removeprefix("torch.")
            limit = f" (the largest finite {dtype} is {torch.finfo(tensor.dtype).max:.4g})"
            raise OutputError(
                f"{where}: tensor '{name}' holds NaN or Inf values as {dtype}"
                f"{limit if tensor.element_size() <= 2 else ''}, so no output was written. Check the "
                f"inputs, their weights and the method parameters."
            )


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 ledger: Ledger | None = None) -> None:
    """``safetensors.torch.save_file`` with write failures reported as :class:`OutputError`.

    Every floating tensor must be finite as stored (:func:`check_finite`). With a ``ledger``
    the tensors' names, shapes, dtypes and hashes are recorded for the output's manifest
    (:mod:`primerge.io.manifest`).
    """
    check_finite(tensors, str(path.name))
    _save_checked(path, tensors, metadata)
    if ledger is not None:
        ledger.record(path, tensors)


def _save_checked(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    """Write tensors already found finite; a failed write is an :class:`OutputError`."""
    try:
        save_file(tensors, str(path), metadata=metadata)
        os.chmod(path, PUBLISHED_MODE)
    except (OSError, SafetensorError) as exc:
        raise OutputError(f"{path}: write failed ({exc}); check free space and permissions.") from None


def join_files(parts: Sequence[Path], target: Path, metadata: dict[str, str] | None) -> None:
    """Write ``target`` holding every tensor of the safetensors files ``parts`` (each written by
    :func:`save_tensors`, so already checked), then remove the parts.

    The parts are memory-mapped and written from the maps: no tensor is copied into this process's
    memory (the pages stay in the page cache). safetensors lays a file out by dtype and name,
    whatever order its tensors come in, so ``target`` is byte for byte the file that one
    :func:`save_tensors` of all these tensors with ``metadata`` writes.
    """
    tensors: dict[str, torch.Tensor] = {}
    for part in parts:
        try:
            tensors.update(load_file(str(part)))
        except (OSError, SafetensorError) as exc:
            raise OutputError(f"{part}: cannot read back a part of {target.name} ({exc}); check the output "
                              f"folder's storage.") from None
    _save_checked(target, tensors, metadata)
    for part in parts:
        part.unlink()


class ShardedWriter:
    """Stream tensors into safetensors shards of at most ``shard_size`` bytes.

    Tensors are buffered until the next one would overflow the shard, then the
    shard is saved, so at most one shard is held in memory (a tensor larger than
    the shard size gets a shard of its own). :meth:`finish` names the files
    ``<stem>.safetensors`` when there is one shard, else
    ``<stem>-0000i-of-0000N.safetensors`` plus ``<stem>.safetensors.index.json``
    (the Hugging Face layout for ``stem = "model"``).
    """

    def __init__(self, folder: Path, shard_size: int = DEFAULT_SHARD_SIZE, stem: str = "model",
                 ledger: Ledger | None = None):
        self.folder = Path(folder)
        self.shard_size = shard_size
        self.stem = stem
        self.ledger = ledger
        # One metadata key only: safetensors keeps metadata in a hash map, so several keys
        # would be written in a varying order and identical merges would differ byte-wise.
        self.metadata = {"format": "pt"}
        self._buffer: dict[str, torch.Tensor] = {}
        self._filled = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._filled + nbytes > self.shard_size:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._filled += nbytes
        self.total_size += nbytes

    def _flush(self) -> None:
        path = self.folder / f".{self.stem}-part{len(self._shards):05d}.safetensors"
        save_tensors(path, self._buffer, self.metadata, self.ledger)
        self._shards.append((path, list(self._buffer)))
        self._buffer, self._filled = {}, 0

    def finish(self) -> list[Path]:
        """Save the last shard, give every shard its final name, write the index; return the files."""
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        files, weight_map = [], {}
        for i, (part, names) in enumerate(self._shards):
            final = self.folder / shard_name(self.stem, i, n)
            os.replace(part, final)
            if self.ledger is not None:
                self.ledger.rename(part, final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        if n > 1:
            files.append(write_index(self.folder, self.stem, weight_map, self.total_size))
        return files


def shard_name(stem: str, index: int, count: int) -> str:
    """File name of shard ``index`` (from 0) of ``count``: ``<stem>.safetensors`` when there is one,
    else ``<stem>-0000i-of-0000N.safetensors`` (the Hugging Face layout for ``stem = "model"``)."""
    return f"{stem}.safetensors" if count == 1 else f"{stem}-{index + 1:05d}-of-{count:05d}.safetensors"


def write_index(folder: Path, stem: str, weight_map: dict[str, str], total_size: int) -> Path:
    """``<stem>.safetensors.index.json``: every tensor's shard and the total stored bytes."""
    index = folder / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2) + "\n")
    return index
