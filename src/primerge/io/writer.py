"""Streaming, atomic output.

:func:`atomic_folder` yields a temporary folder beside the destination and
renames it into place only when the body of the ``with`` finished without an
error; on any error or interrupt the temporary folder is removed and the
destination is left as it was. :class:`ShardedWriter` streams tensors into
safetensors shards (``model.safetensors``, or ``model-0000i-of-0000N.safetensors``
plus ``model.safetensors.index.json`` above the shard size), holding at most one
shard in memory.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from primerge.errors import OutputError
from primerge.io.manifest import Ledger

DEFAULT_SHARD_SIZE = 2 * 1024**3
TEMP_MARK = ".primerge-incomplete-"


def parse_size(text: str | int) -> int:
    """Bytes from ``2GB``, ``500MB``, ``64KiB`` or an integer."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    try:
        return int(float(number) * units[s[len(number):]])
    except (ValueError, KeyError):
        raise OutputError(f"cannot read the size '{text}'; write e.g. 2GB or 500MB.") from None


@contextmanager
def atomic_folder(destination: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder that becomes ``destination`` on success.

    An existing ``destination`` is replaced only with ``force`` and only after the
    new output is complete (it is moved aside, the new folder renamed in, then
    the old one deleted). The temporary folder's name carries the writing process's
    id; temporary folders of the same destination left by a process that no longer
    runs (killed with SIGKILL, power loss) are removed first.
    """
    destination = Path(destination)
    temp = destination.parent / f".{destination.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(destination)
        temp.mkdir()
    except OSError as exc:
        raise OutputError(f"{destination}: cannot create the output folder ({exc}); "
                          f"check the path and permissions.") from None
    try:
        yield temp
        if destination.is_dir() and not any(destination.iterdir()):
            destination.rmdir()  # an empty folder holds nothing to protect
        if destination.exists() or destination.is_symlink():
            if not force:
                raise OutputError(f"{destination}: exists; use --force to replace it.")
            aside = destination.parent / f".{destination.name}.primerge-old-{uuid.uuid4().hex[:8]}"
            os.replace(destination, aside)
            try:
                os.replace(temp, destination)
            except BaseException:
                os.replace(aside, destination)  # put the previous output back
                raise
            if aside.is_dir() and not aside.is_symlink():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                aside.unlink()
        else:
            os.replace(temp, destination)
    except OSError as exc:
        shutil.rmtree(temp, ignore_errors=True)
        raise OutputError(f"{destination}: the merge failed with an I/O error ({exc}); nothing was "
                          f"left in place. Check free space and permissions.") from None
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _remove_stale(destination: Path) -> None:
    """Delete ``destination``'s temporary folders whose writing process has exited."""
    for stale in destination.parent.glob(f".{glob.escape(destination.name)}{TEMP_MARK}*"):
        pid = stale.name[len(destination.name) + 1 + len(TEMP_MARK):].split("-")[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 ledger: Ledger | None = None) -> None:
    """``safetensors.torch.save_file`` with write failures reported as :class:`OutputError`.

    With a ``ledger`` the tensors' names, shapes, dtypes and hashes are recorded for
    the output's manifest (:mod:`primerge.io.manifest`).
    """
    try:
        save_file(tensors, str(path), metadata=metadata)
    except (OSError, SafetensorError) as exc:
        raise OutputError(f"{path}: write failed ({exc}); check free space and permissions.") from None
    if ledger is not None:
        ledger.record(path, tensors)


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


def copy_support_files(files: list[Path], target: Path) -> list[str]:
    """Copy a model folder's checked support files (config, tokenizer, ...) into ``target``.

    ``files`` is :attr:`primerge.io.readers.Checkpoint.support` (already vetted:
    no links out of the folder, JSON that parses). Returns the names copied.
    """
    for item in files:
        try:
            shutil.copyfile(item, target / item.name)
        except OSError as exc:
            raise OutputError(f"{target / item.name}: copy failed ({exc}); check free space.") from None
    return [item.name for item in files]
