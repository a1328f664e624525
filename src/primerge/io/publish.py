"""Putting a finished output folder in place, crash-safe: a signal or a crash at any instant leaves
the earlier output or the new one at the destination, or a journal that the next run (and
``primerge verify``) completes.

:func:`move_into_place` moves a complete temporary folder to the destination:

* nothing there, or an empty folder: one ``rename`` (POSIX renames a folder over an empty one), atomic;
* an earlier output (``--force``): on Linux, one ``renameat2(RENAME_EXCHANGE)`` swaps the two
  folders atomically (the earlier output is then under the temporary name and deleted; a crash
  before that deletion leaves it in a temporary folder whose writer is dead, which the next run
  removes). Where the file system or kernel cannot exchange, a journal
  (``.<name>.primerge-journal``, written and synced before anything moves) names the two folders;
  then the earlier output is renamed aside (``.<name>.primerge-old-*``), the new one into place,
  the aside deleted, and the journal last. :func:`recover` reads a journal whose writer is gone
  (its lock file is not held) and finishes what it says: with no destination it renames the new
  output into place (it was complete, or there would be no journal) or, failing that, the earlier
  one back; with a destination it deletes the aside. An aside without a journal (left by primerge
  before journals) is restored when the destination is missing and deleted otherwise.

SIGINT, SIGTERM and SIGHUP are held back while the folders move (:func:`signals_deferred`): such a
signal lands after the publish, not between its steps. SIGKILL cannot be held back, which is what
the exchange and the journal are for. Every rename is followed by an ``fsync`` of the parent folder.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import json
import os
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Marks of the folders and files beside the destination: a writer's temporary folder, an earlier
#: output moved aside, the journal.
TEMP_MARK = ".primerge-incomplete-"
OLD_MARK = ".primerge-old-"
JOURNAL_SUFFIX = ".primerge-journal"
#: renameat2's flag that swaps two paths atomically (linux/fs.h).
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
#: errno values meaning "this kernel or file system cannot exchange", not a failure of the paths.
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}
_DEFERRED = {getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)}


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back until the block ends: their handlers are replaced by one
    that notes the signal, and each noted signal is raised again once the earlier handlers are back,
    so it lands after the block, never between its steps. (Masking the signal would not do: Python
    runs its handlers in the main thread whichever thread the kernel delivers the signal to.) Only
    the main thread can set handlers; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: noted.append(signum)) for sig in _DEFERRED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for sig in dict.fromkeys(noted):
            signal.raise_signal(sig)


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so the renames in it survive a power loss (best effort where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot sync folders: the rename is still atomic
        pass
    finally:
        os.close(fd)


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths atomically (``renameat2(RENAME_EXCHANGE)``); ``False``, with nothing
    changed, where the platform, kernel or file system cannot."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(second))


def journal_path(destination: Path) -> Path:
    return destination.parent / f".{destination.name}{JOURNAL_SUFFIX}"


def _write_journal(journal: Path, record: dict) -> None:
    """The journal, complete or absent: written beside, synced, renamed into place, folder synced."""
    part = journal.with_name(journal.name + ".part")
    with open(part, "w") as handle:
        json.dump(record, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(part, journal)
    _sync_folder(journal.parent)


def move_into_place(new: Path, destination: Path, lock: Path | None = None) -> None:
    """Make the complete folder ``new`` the ``destination``, replacing what is there (nothing, an
    empty folder, or an earlier output); see the module docstring. ``lock`` is the writer's lock
    file, held while this runs (a journal names it, so recovery can tell a live writer)."""
    with signals_deferred():
        if not os.path.lexists(destination) or _empty(destination):
            _rename(new, destination)
        elif exchange(new, destination):
            _sync_folder(destination.parent)
            _remove_tree(new)  # the earlier output, under the temporary name
        else:
            _journaled_replace(new, destination, lock)


def _empty(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return next(entries, None) is None


def _journaled_replace(new: Path, destination: Path, lock: Path | None) -> None:
    """Replace ``destination`` by ``new`` through a journal (where folders cannot be exchanged)."""
    aside = destination.parent / f".{destination.name}{OLD_MARK}{uuid.uuid4().hex[:8]}"
    journal = journal_path(destination)
    _write_journal(journal, {"new": new.name, "old": aside.name, "lock": lock.name if lock else None})
    _rename(destination, aside)
    _rename(new, destination)
    _remove_tree(aside)
    _remove_journal(journal)


# The steps a publish is made of (the tests interrupt each one).


def _rename(source: Path, target: Path) -> None:
    """``rename(2)``, then the folder synced."""
    os.replace(source, target)
    _sync_folder(target.parent)


def _remove_tree(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def _remove_journal(journal: Path) -> None:
    """The journal, and a part of one a crash left unfinished."""
    journal.unlink(missing_ok=True)
    journal.with_name(journal.name + ".part").unlink(missing_ok=True)
    _sync_folder(journal.parent)


def _ours(destination: Path, name: object, mark: str) -> Path | None:
    """``name`` from a journal as a folder beside ``destination`` with ``mark``; ``None`` for
    anything else (a journal is a file anyone could have written: it never names other paths)."""
    if not isinstance(name, str) or "/" in name or "\0" in name or not name.startswith(f".{destination.name}{mark}"):
        return None
    path = destination.parent / name
    return path if path.is_dir() and not path.is_symlink() else None


def _held(lock: Path) -> bool:
    """Whether a live process holds the writer's lock file ``lock``."""
    try:
        handle = open(lock, "r+")
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            return exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _read_journal(journal: Path) -> dict:
    try:
        with open(journal, "rb") as handle:  # a regular file primerge wrote (checked by the caller)
            record = json.loads(handle.read(4096))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def recover(destination: Path) -> str | None:
    """Finish a publish of ``destination`` that a crash interrupted (see the module docstring);
    returns what was done, in words, or ``None`` when there was nothing to finish."""
    if not destination.parent.is_dir():
        return None  # nothing of a publish can be there
    journal = journal_path(destination)
    record = _read_journal(journal) if journal.is_file() and not journal.is_symlink() else {}
    lock = record.get("lock")
    if record and isinstance(lock, str) and "/" not in lock and _held(destination.parent / lock):
        return None  # a live writer is publishing right now
    asides = sorted((p for p in destination.parent.glob(f".{glob.escape(destination.name)}{OLD_MARK}*")
                     if p.is_dir() and not p.is_symlink()), key=lambda p: p.stat().st_mtime_ns)
    if not record and not asides:
        journal.with_name(journal.name + ".part").unlink(missing_ok=True)
        return None
    with signals_deferred():
        done = _finish(destination, record, asides)
        _remove_journal(journal)
    return done


def _finish(destination: Path, record: dict, asides: list[Path]) -> str:
    new = _ours(destination, record.get("new"), TEMP_MARK)
    old = _ours(destination, record.get("old"), OLD_MARK) or (asides[-1] if asides else None)
    done = f"{destination}: an interrupted replacement was finished"
    if not os.path.lexists(destination):
        if new is not None:
            _rename(new, destination)
            done = f"{destination}: an interrupted replacement was completed (the new output is in place)"
        elif old is not None:
            _rename(old, destination)
            done = f"{destination}: an interrupted replacement was rolled back (the earlier output is in place)"
    for aside in asides:
        if aside.exists():
            _remove_tree(aside)
    return done
