"""The private local Ray instance of a metarec driver: its session folder goes with it,
and what a killed driver left is reaped by the next one.

A driver killed with SIGKILL cannot stop the local Ray instance it started: its GCS,
raylet, dashboard and runtime-env agents live on for a minute or more (on loopback),
and the session's folder under Ray's temp dir stays for good. So every driver that
starts a local instance records it (`record`: its pid and start time, and the Ray
session name, in `<ray temp dir>/metarec-drivers/`), removes the record when it shuts
Ray down (`forget`), and, before starting one, reaps the sessions of recorded drivers
that are gone (`reap_killed`): it ends the processes of *those* sessions only (matched
by their `--session-name` argument and this user's uid) and deletes their session
folders. A command that shuts its instance down after a clean end (exit 0, or 143 on
SIGTERM) deletes the session folder too (`remove_folder`), once the instance's processes
have exited: Ray keeps it, with its logs, for good; a failed command keeps it for
diagnosis. Linux only (reads /proc); elsewhere a no-op.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time

_SESSION = re.compile(r"^session_[0-9_-]+$")
_ARG = "--session-name="
_LATEST = "session_latest"  # Ray's link to the newest session folder
GRACE_S = 5.0
EXIT_WAIT_S = 10.0

_own: str | None = None  # the session this driver recorded


def ray_temp_dir() -> str:
    """Ray's temp dir, where its session folders are: `$RAY_TMPDIR/ray`, else `/tmp/ray` (or `$TMPDIR/ray`)."""
    return os.path.join(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir(), "ray")


def _registry() -> str:
    return os.path.join(ray_temp_dir(), "metarec-drivers")


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (None if it is gone): with the pid,
    it names one process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _own_pids() -> list[int]:
    uid = os.getuid()
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{name}").st_uid == uid:
                    pids.append(int(name))
    return pids


def _session_of_children() -> str | None:
    """The `--session-name` of a Ray process this process started (its local instance)."""
    me = os.getpid()
    for pid in _own_pids():
        if _parent(pid) == me:
            for arg in _cmdline(pid):
                if arg.startswith(_ARG) and _SESSION.match(arg[len(_ARG):]):
                    return arg[len(_ARG):]
    return None


def _record_path() -> str:
    return os.path.join(_registry(), f"{os.getpid()}.json")


def record() -> str | None:
    """Record this driver and the session of the local Ray instance it has just started;
    returns the session's name (None where nothing is recorded)."""
    if not sys.platform.startswith("linux"):
        return None
    session = _session_of_children()
    if session is None:
        return None
    os.makedirs(_registry(), exist_ok=True)
    path = _record_path()
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "start": _start_time(os.getpid()), "session": session}, f)
    os.replace(tmp, path)
    global _own
    _own = session
    return session


def own_session() -> str | None:
    """The session of the local instance this driver recorded and has not forgotten."""
    return _own


def forget() -> None:
    """This driver shut its local Ray instance down: nothing to reap."""
    global _own
    _own = None
    with contextlib.suppress(OSError):
        os.unlink(_record_path())


def wait_exited(processes: list[tuple[int, str | None, str]]) -> None:
    """Wait until `processes` (a session's, listed before its shutdown) have exited, at most EXIT_WAIT_S."""
    deadline = time.monotonic() + EXIT_WAIT_S
    while any(running(pid, start) for pid, start, _ in processes) and time.monotonic() < deadline:
        time.sleep(0.05)


def remove_folder(session: str) -> None:
    """Delete the session's folder (and Ray's `session_latest` link if it names it); the
    caller has let its processes exit first (`wait_exited`)."""
    if not _SESSION.match(session):
        return
    folder = os.path.join(ray_temp_dir(), session)
    if os.path.isdir(folder) and not os.path.islink(folder):
        shutil.rmtree(folder, ignore_errors=True)
    latest = os.path.join(ray_temp_dir(), _LATEST)
    with contextlib.suppress(OSError):
        if os.path.islink(latest) and os.path.basename(os.readlink(latest).rstrip(os.sep)) == session:
            os.unlink(latest)


def reap_killed() -> list[str]:
    """End the processes and delete the folders of the local Ray sessions whose recorded
    driver is gone; returns the sessions reaped."""
    if not sys.platform.startswith("linux") or not os.path.isdir(_registry()):
        return []
    reaped = []
    for name in sorted(os.listdir(_registry())):
        path = os.path.join(_registry(), name)
        try:
            with open(path) as f:
                entry = json.load(f)
            pid, start, session = int(entry["pid"]), entry["start"], str(entry["session"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _start_time(pid) is not None and _start_time(pid) == start:
            continue  # its driver is running
        if _SESSION.match(session):
            _end_session(session)
            remove_folder(session)
            reaped.append(session)
        with contextlib.suppress(OSError):
            os.unlink(path)
    if reaped:
        print(f"reaped {len(reaped)} local Ray instance{'s' if len(reaped) > 1 else ''} left by a killed metarec driver "
              f"({', '.join(reaped)})", file=sys.stderr, flush=True)
    return reaped


def running(pid: int, start: str | None) -> bool:
    """Whether the process `pid` started at `start` still runs (not exited, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return start is not None and fields[19] == start and fields[0] not in ("Z", "X")


def processes(session: str) -> list[tuple[int, str | None, str]]:
    """(pid, start time, program name) of a running session's processes: those that name it
    in their arguments (GCS, raylet, monitors) and their children (the raylet's agents and
    workers, whose titles Ray rewrites)."""
    named = dict(_session_pids(session))
    children = {pid: _start_time(pid) for pid in _own_pids() if pid != os.getpid() and _parent(pid) in named}
    return [(pid, start, os.path.basename((_cmdline(pid) or [""])[0]))
            for pid, start in sorted({**named, **children}.items())]


def _session_pids(session: str) -> list[tuple[int, str | None]]:
    arg = f"{_ARG}{session}"
    folder = os.path.join(ray_temp_dir(), session) + os.sep
    return [(pid, _start_time(pid)) for pid in _own_pids()
            if pid != os.getpid() and any(a == arg or a.startswith(folder) or f"={folder}" in a for a in _cmdline(pid))]


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _end_session(session: str) -> None:
    """SIGTERM the session's processes, then SIGKILL those still there after GRACE_S."""
    procs = _session_pids(session)
    for pid, _ in procs:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while procs and time.monotonic() < deadline:
        procs = [(pid, start) for pid, start in procs if _start_time(pid) == start]
        time.sleep(0.05)
    for pid, start in procs:
        if _start_time(pid) == start:  # the same process, not a reused pid
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
