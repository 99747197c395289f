"""One clear line when the raylet of this command's local Ray instance dies.

When the raylet of the private local instance dies (SIGKILL, the OOM killer), Ray's core
worker in this driver ends the process with `_exit(1)` at its next access to the object
store (the store lives in the raylet, and Ray's store client exits on a broken connection),
before any Python code sees an error: no `error:` line, the run directory's `.lock` left
behind. For the driver runner that access comes at the latest with the `ray.put` of θ that
starts the next iteration.

So the command line (`metarec.cli.main`) calls `enable()`, and when
`metarec.ray.session.connect` has started a local instance it calls `start(session)`: a
daemon thread waits for the raylet to exit (on its pidfd, so it wakes at once; where
pidfds are missing it polls every 50 ms). When it does, the thread removes the run
directory locks this process holds (`metarec.run_dir.release_held_locks`), prints one
line `error: ...`, SIGKILLs the instance's other processes (its GCS, and its agents,
which outlive their raylet by a minute or more even after a SIGTERM) and ends this
process with status 2. The record of the instance stays: the next local-Ray run deletes
its session folder (metarec.ray.sessions). `stop()` (`metarec.ray.session.shutdown`,
before `ray.shutdown`) ends the watch, so that a normal shutdown is not taken for a
death. Linux only (reads /proc).

The window: if the raylet dies while the main thread is inside an object-store call (the
`ray.put` of θ, a `ray.get` of a result kept in the store: microseconds to milliseconds per
iteration), Ray's `_exit(1)` can come first: exit status 1 and no line; the `.lock` file
stays (the next run takes it over, the kernel dropped the flock) and the next local-Ray
run reaps what is left of the instance (metarec.ray.sessions).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading

from metarec.ray import sessions

POLL_S = 0.05

_enabled = False
_watch: tuple[threading.Thread, int] | None = None  # the thread and the pipe end that wakes it


def enable() -> None:
    """This process is the command line: exit with one line and status 2 if the raylet of
    the local instance it starts dies."""
    global _enabled
    _enabled = True


def start(session: str | None) -> None:
    """Watch the raylet of the local instance `session` (no-op unless `enable()`d, on Linux)."""
    global _watch
    if not _enabled or session is None or _watch is not None or not sys.platform.startswith("linux"):
        return
    procs = sessions.processes(session)
    raylets = [(pid, start) for pid, start, name in procs if name == "raylet"]
    if len(raylets) != 1:
        return
    others = [(pid, start) for pid, start, name in procs if name != "raylet"]
    wake_read, wake_write = os.pipe()
    thread = threading.Thread(target=_watch_raylet, args=(*raylets[0], others, wake_read),
                              name="metarec-raylet-watch", daemon=True)
    thread.start()
    _watch = (thread, wake_write)


def stop() -> None:
    """End the watch (before this process shuts its Ray instance down)."""
    global _watch
    if _watch is None:
        return
    thread, wake_write = _watch
    _watch = None
    with contextlib.suppress(OSError):
        os.write(wake_write, b"x")
    thread.join(timeout=5)
    with contextlib.suppress(OSError):
        os.close(wake_write)


def _watch_raylet(pid: int, start: str | None, others: list[tuple[int, str | None]], wake_read: int) -> None:
    try:
        died = _wait_for_exit(pid, start, wake_read)
    finally:
        os.close(wake_read)
    if died:
        _stop_the_command(pid, others)


def _wait_for_exit(pid: int, start: str | None, wake_read: int) -> bool:
    """True once the process `pid` (started at `start`) has exited, False when `stop()` wakes us."""
    poller = select.poll()
    poller.register(wake_read, select.POLLIN)
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (old kernel), or the raylet is already gone
        pidfd = None
    try:
        if pidfd is not None and sessions.running(pid, start):  # the pidfd is the raylet's, not a reused pid's
            poller.register(pidfd, select.POLLIN)
            return all(fd == pidfd for fd, _ in poller.poll())
        while sessions.running(pid, start):
            if poller.poll(POLL_S * 1000):
                return False
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _stop_the_command(raylet: int, others: list[tuple[int, str | None]]) -> None:
    """The raylet died: lock files, one line, the instance's other processes, exit 2."""
    from metarec.run_dir import release_held_locks

    release_held_locks()
    sys.stderr.write(f"error: the raylet of this command's local Ray instance (pid {raylet}) died (killed, or out of "
                     "memory?); stopped; a run continues from its last step checkpoint with --resume\n")
    sys.stderr.flush()
    for pid, start in others:
        if sessions.running(pid, start):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    os._exit(2)
