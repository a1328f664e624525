"""The Ray runtime primerge starts ends with the process that started it, and leaves no session folder.

Run as a script beside the driver (``python ray_reaper.py TOKEN DRIVER_PID``; standard library
only, so it starts in milliseconds and imports neither torch nor primerge): it reads its stdin, a
pipe whose only writer is the driver, until the end of file. That end comes when the driver closes
the pipe after ``ray.shutdown()`` or when the driver dies in any way, SIGKILL included (the kernel
closes a dead process's descriptors). Meanwhile the driver writes the runtime's session folder
to the pipe. At the end of file the reaper

1. stops every process of this user whose environment holds ``PRIMERGE_RAY_RUN=TOKEN``: the
   variable was set while ``ray.init`` started the runtime, so the GCS, the raylet and everything
   they start (workers, the dashboard and runtime-env agents) inherit it, and nothing else has it.
   SIGTERM first; what is still alive after :data:`GRACE` seconds gets SIGKILL;
2. removes the session folder (``<ray temp>/session_*``), and Ray's ``session_latest`` link when it
   points there.

Ray's agents otherwise outlive a killed driver by up to a minute, and every session folder stays.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

#: The environment variable that marks the processes of one runtime.
VARIABLE = "PRIMERGE_RAY_RUN"
#: Seconds between SIGTERM and SIGKILL.
GRACE = 3.0


def marked_processes(token: str, spare: set[int]) -> list[int]:
    """Process ids (this user's, Linux ``/proc``) whose environment holds ``VARIABLE=token``."""
    needle = f"{VARIABLE}={token}".encode()
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) in spare:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:  # gone, or another user's
            continue
    return found


def stop(token: str, spare: set[int]) -> None:
    """SIGTERM every marked process, then SIGKILL those still alive after :data:`GRACE` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = marked_processes(token, spare)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:  # the process exited meanwhile (or is not ours to signal): nothing to stop
                pass
        deadline = time.monotonic() + GRACE
        while sig == signal.SIGTERM and pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = marked_processes(token, spare)


def remove_session(session: str) -> None:
    """Delete a session folder (only a ``session_*`` folder) and a ``session_latest`` link to it."""
    if not session or not os.path.basename(session.rstrip("/")).startswith("session_"):
        return
    latest = os.path.join(os.path.dirname(session.rstrip("/")), "session_latest")
    if os.path.islink(latest) and os.path.realpath(latest) == os.path.realpath(session):
        os.unlink(latest)
    shutil.rmtree(session, ignore_errors=True)


def main(token: str, driver: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver must not stop the cleanup
    session = ""
    for line in sys.stdin:
        session = line.strip() or session
    stop(token, {os.getpid(), driver})
    remove_session(session)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
