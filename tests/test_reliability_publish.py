"""A crash-safe ``--force`` (issue 28, class 5): replacing an earlier output never leaves the user with
neither output, whatever interrupts the publish and wherever.

The publish is a sequence of steps (:mod:`primerge.io.publish`: the exchange, renames, folder syncs,
the journal's writes and removals, the old folder's deletion). Each test interrupts it at every step
in turn, by a fault injected into that step, not by timing:

* SIGKILL (nothing of the process runs after it): the publish runs in a forked child whose k-th step
  kills it, with the folders exchanged atomically and, separately, with exchange unavailable (the
  journal path). Right after the kill the destination holds the earlier or the new output, or a
  journal says how to finish; ``primerge verify`` (and the next run) finishes it, and the next run
  leaves nothing behind;
* SIGTERM / Ctrl-C (handlers run): the signal sent inside the k-th step lands after the publish, so
  the new output is complete in place and nothing is deleted;
* a step that fails (an OSError) is an error with the earlier output in place or recoverable.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

import primerge
from primerge.io import publish
from primerge.io.manifest import verify_folder
from primerge.io.writer import LOCK_SUFFIX, TEMP_MARK
from refusals import TASK_SPECIFIC, leftovers

#: Every step function of a publish (module globals, so a wrapper installed here is what runs).
STEPS = ("exchange", "_rename", "_remove_tree", "_write_journal", "_remove_journal", "_sync_folder")


def digest(folder: Path) -> str:
    """SHA-256 of a folder's files, by relative name (the card too: it differs between the outputs)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def outputs(zoo, tmp_path_factory):
    """An earlier output (Task Arithmetic) and a new one (TIES) of the same destination name."""
    root = tmp_path_factory.mktemp("publish")
    p = zoo["paths"]
    old = primerge.merge(p["base"], p["models"], "task_arithmetic", task_specific=TASK_SPECIFIC, out=root / "old").out
    new = primerge.merge(p["base"], p["models"], "ties", task_specific=TASK_SPECIFIC, out=root / "new").out
    return {"old": old, "new": new, "digests": {digest(old): "old", digest(new): "new"}}


def staged(outputs, folder: Path) -> tuple[Path, Path, Path]:
    """The destination holding the earlier output, and a writer's finished temporary folder (with its
    lock file) holding the new one: the state just before a publish."""
    dest = folder / "merged"
    shutil.copytree(outputs["old"], dest)
    temp = folder / f".merged{TEMP_MARK}{os.getpid()}-0badcafe"
    shutil.copytree(outputs["new"], temp)
    lock = temp.with_name(temp.name + LOCK_SUFFIX)
    lock.touch()
    return dest, temp, lock


def interrupt_at(step: int, action) -> None:
    """Wrap every step function so that the ``step``-th call (from 1) runs ``action`` first."""
    calls = [0]

    def wrapped(real):
        def step_function(*args, **kwargs):
            calls[0] += 1
            if calls[0] == step:
                action()
            return real(*args, **kwargs)
        return step_function

    for name in STEPS:
        setattr(publish, name, wrapped(getattr(publish, name)))


def killed_publish(dest: Path, temp: Path, lock: Path, step: int, exchange: bool) -> bool:
    """Publish in a forked child that SIGKILLs itself at ``step``; whether it was killed (a child
    whose publish has fewer steps finishes it)."""
    child = os.fork()
    if child == 0:  # the child: hold the writer's lock as a writer does, publish, die at the step
        try:
            handle = open(lock, "r+")
            fcntl.flock(handle, fcntl.LOCK_EX)
            if not exchange:
                publish.exchange = lambda first, second: False
            interrupt_at(step, lambda: os.kill(os.getpid(), signal.SIGKILL))
            publish.move_into_place(temp, dest, lock)
        finally:
            os._exit(0)
    _, status = os.waitpid(child, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "journal"])
def test_sigkill_at_every_step_leaves_one_output_or_a_journal_that_is_finished(zoo, outputs, tmp_path, exchange):
    names = outputs["digests"]
    for step in range(1, 30):
        folder = tmp_path / f"step{step}"
        folder.mkdir()
        dest, temp, lock = staged(outputs, folder)
        if not killed_publish(dest, temp, lock, step, exchange):
            assert names[digest(dest)] == "new" and not temp.exists()  # no fault landed: published
            break
        journal = publish.journal_path(dest)
        if dest.exists():
            assert digest(dest) in names, step  # the earlier or the new output, whole
        else:
            assert not exchange and journal.exists(), step  # only a journaled publish has such a moment
        report = verify_folder(dest)  # finishes what the journal (or an aside) says, then verifies
        assert report.ok and digest(dest) in names, (step, report.problems)
        assert not journal.exists()
        p = zoo["paths"]
        primerge.merge(p["base"], p["models"], "ties", task_specific=TASK_SPECIFIC, out=dest, force=True)
        assert names[digest(dest)] == "new" and leftovers(dest) == [], (step, leftovers(dest))
    else:
        pytest.fail("the publish never finished: more steps than expected")
    assert step > (2 if exchange else 5)  # every step was interrupted at least once


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "journal"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_at_any_step_lands_after_the_publish(outputs, tmp_path, monkeypatch, exchange, sig):
    """As the command line handles them (SIGTERM raises SystemExit, SIGINT KeyboardInterrupt), a
    signal sent inside any step is held until the new output is in place; nothing is deleted."""
    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    interrupt = signal.signal(signal.SIGINT, signal.default_int_handler)  # as the command line has it
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        for step in range(1, 30):
            folder = tmp_path / f"{sig.name}-{step}"
            folder.mkdir()
            dest, temp, lock = staged(outputs, folder)
            with monkeypatch.context() as patch:
                for name in STEPS:
                    patch.setattr(publish, name, getattr(publish, name))  # undone after each step
                if not exchange:
                    patch.setattr(publish, "exchange", lambda first, second: False)
                interrupt_at(step, lambda: os.kill(os.getpid(), sig))
                try:
                    publish.move_into_place(temp, dest, lock)
                    landed = False
                except (SystemExit, KeyboardInterrupt):
                    landed = True
            assert outputs["digests"][digest(dest)] == "new", step  # complete, in place
            assert not temp.exists() and not publish.journal_path(dest).exists()
            if not landed:
                break
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, interrupt)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    assert step > 2


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "journal"])
def test_a_failing_step_is_an_error_with_an_output_in_place(outputs, tmp_path, monkeypatch, exchange):
    for step in range(1, 30):
        folder = tmp_path / f"step{step}"
        folder.mkdir()
        dest, temp, lock = staged(outputs, folder)

        def fail():
            raise OSError(5, "Input/output error")

        with monkeypatch.context() as patch:
            for name in STEPS:
                patch.setattr(publish, name, getattr(publish, name))
            if not exchange:
                patch.setattr(publish, "exchange", lambda first, second: False)
            interrupt_at(step, fail)
            try:
                publish.move_into_place(temp, dest, lock)
                failed = False
            except OSError:
                failed = True
        assert verify_folder(dest).ok and digest(dest) in outputs["digests"], step
        if not failed:
            break


def test_an_aside_left_by_an_earlier_primerge_is_restored_or_removed(outputs, tmp_path):
    """Before journals, a SIGKILL between the two renames left the earlier output only in
    ``.<name>.primerge-old-*``: with the destination missing it is put back, else removed."""
    dest = tmp_path / "merged"
    aside = tmp_path / f".merged{publish.OLD_MARK}1234abcd"
    shutil.copytree(outputs["old"], aside)
    assert verify_folder(dest).ok and outputs["digests"][digest(dest)] == "old" and not aside.exists()
    shutil.copytree(outputs["old"], aside)
    assert "rolled back" not in (publish.recover(dest) or "") and not aside.exists()


def test_a_planted_journal_moves_nothing_outside_its_own_names(outputs, tmp_path):
    """A journal is a file anyone could write beside an output: it may only name the writer's own
    temporary folder and aside, never another path."""
    dest = tmp_path / "merged"
    elsewhere = tmp_path / "precious"
    shutil.copytree(outputs["old"], elsewhere)
    publish.journal_path(dest).write_text(json.dumps({"new": "precious", "old": "../precious", "lock": None}))
    publish.recover(dest)
    assert not dest.exists() and digest(elsewhere) == digest(outputs["old"])
    assert not publish.journal_path(dest).exists()


def test_a_journal_of_a_live_writer_is_left_alone(outputs, tmp_path):
    dest, temp, lock = staged(outputs, tmp_path)
    publish.journal_path(dest).write_text(json.dumps({"new": temp.name, "old": ".merged.primerge-old-x",
                                                      "lock": lock.name}))
    with open(lock, "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        assert publish.recover(dest) is None
        assert publish.journal_path(dest).exists() and temp.exists()
