"""Joining Ray, and what every Ray worker of metarec shares.

Token authentication (Ray ≥ 2.5x). `connect(None)` (`metarec train --ray`) starts a
private local instance bound to 127.0.0.1 and keeps token auth on: unless
`RAY_AUTH_MODE` is set to something else than `token`, it sets `RAY_AUTH_MODE=token`
and, if neither `RAY_AUTH_TOKEN` nor `RAY_AUTH_TOKEN_PATH` is set, a fresh random
`RAY_AUTH_TOKEN` for this process and the Ray processes it starts. (Left to itself,
`ray.init()` would also turn token auth on, but would write a token to
`~/.ray/auth_token` if none exists there.) Any other `RAY_AUTH_MODE` (`disabled`) is
refused with one line: an unauthenticated local instance would run anyone's tasks.
`connect(address)` joins a running cluster: the token then comes from the cluster's
usual sources (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`); with
`auto`, Ray turns token mode on when such a token exists; with an explicit address,
set `RAY_AUTH_MODE=token`. Jobs submitted with `ray job submit` inherit both from
the cluster.

Loopback. `ray.init(_node_ip_address="127.0.0.1")` alone is not enough on Linux: Ray
replaces a loopback address by the machine's outward IP, registers the node there, and
its agents listen on it, while GCS, raylet and workers listen on all interfaces. In
Ray's single-machine mode (`metarec.ray.private.single_machine_mode`) the node IP stays
127.0.0.1 and every server binds to it. Joining a cluster at a loopback address (e.g. a
local multi-node cluster whose nodes all run on 127.0.0.1) happens in that mode too:
otherwise Ray would replace 127.0.0.1 in the address by the outward IP, where nothing
listens, and retry for ever.

`shutdown` is the one way a command shuts Ray down (it first stops the watch on the local
raylet, metarec.ray.raylet_watch). Also here: the workers' config and torch threads, the
one unwrapping of Ray's errors, and the one parser of the test-only fault-injection
variables.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
from typing import Any

import ray
import torch

from metarec.config import Config, absolute_data_root
from metarec.errors import ConfigError, MetaRecError, quote
from metarec.ray import private

LOOPBACK = "127.0.0.1"


def enable_local_token_auth() -> bool:
    """Keep token auth on for a private local Ray instance (module docstring); returns True.

    ConfigError if `RAY_AUTH_MODE` asks for another mode (e.g. `disabled`)."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        raise ConfigError(f"RAY_AUTH_MODE={quote(mode, 40)}: metarec does not start a local Ray instance without token "
                          "authentication (any local process could run code in it); unset RAY_AUTH_MODE or set it to token")
    os.environ["RAY_AUTH_MODE"] = "token"
    if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    private.reset_token_cache()
    return True


def connect(address: str | None) -> None:
    """Join `address` (auto or host:port; default `RAY_ADDRESS`), or start a private
    local Ray instance bound to 127.0.0.1 with token auth on."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        loopback = private.single_machine_mode() if is_loopback_address(address) else contextlib.nullcontext()
        with loopback, _keep_sigterm_handler():
            ray.init(address=address, log_to_driver=True)
        return
    enable_local_token_auth()
    from metarec.ray import raylet_watch, sessions

    sessions.reap_killed()  # what a killed driver's local instance left
    with private.single_machine_mode(), _keep_sigterm_handler():
        ray.init(address="local", include_dashboard=False, dashboard_host=LOOPBACK,
                 _node_ip_address=LOOPBACK, log_to_driver=True)
    raylet_watch.start(sessions.record())  # the command line exits with one line if the raylet dies


_REMOVE_AT_SHUTDOWN: list[str] = []


def remove_at_shutdown(path: str) -> None:
    """Have `shutdown` delete the local folder `path` once Ray's processes have exited: a
    folder Ray workers write to (Ray Train's scratch) cannot be removed for good while a
    worker may still write there, e.g. when SIGTERM ends the driver mid-run."""
    _REMOVE_AT_SHUTDOWN.append(path)


def shutdown(*, keep_logs: bool = False) -> None:
    """Shut Ray down as a command ends: stop watching the local raylet (metarec.ray.raylet_watch),
    `ray.shutdown()`, drop this driver's record of its local instance (nothing to reap), wait
    for the instance's processes to exit, delete the folders `remove_at_shutdown` named and,
    unless `keep_logs` (a failed command), the instance's session folder (metarec.ray.sessions)."""
    from metarec.ray import raylet_watch, sessions

    raylet_watch.stop()
    session = sessions.own_session() if (_REMOVE_AT_SHUTDOWN or not keep_logs) else None
    processes = sessions.processes(session) if session else []
    ray.shutdown()
    sessions.forget()
    sessions.wait_exited(processes)
    while _REMOVE_AT_SHUTDOWN:
        shutil.rmtree(_REMOVE_AT_SHUTDOWN.pop(), ignore_errors=True)
    if session and not keep_logs:
        sessions.remove_folder(session)


def is_loopback_address(address: str) -> bool:
    """Whether a Ray address `host:port` names a loopback host (127.0.0.0/8, ::1, localhost)."""
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def _keep_sigterm_handler():
    """Keep the process's SIGTERM handler across `ray.init`, which replaces it with its own
    (`sys.exit(15)`, behind a native handler that prints a crash trace): the CLI's handler
    exits 143 after shutting Ray down cleanly."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def worker_config(cfg: Config) -> dict[str, Any]:
    """The config the workers build their problem from: a local `data.root` made absolute,
    so workers whose working directory differs find the data."""
    return absolute_data_root(cfg.to_dict())


def set_worker_threads(cpus: float) -> None:
    """Torch threads of a worker (or Tune trial) that holds `cpus` CPUs: at least one."""
    torch.set_num_threads(max(1, int(cpus)))


def user_error(err: BaseException) -> MetaRecError | None:
    """The MetaRecError a Ray task or Ray Train worker raised, unwrapped (None if none)."""
    for cause in _causes(err):
        if isinstance(cause, MetaRecError):
            return cause
    return None


def error_line(err: BaseException) -> str:
    """One line for an error that came through Ray: the innermost error's type and the
    first line of its message."""
    inner = next(iter(_causes(err)), err)
    first = (str(inner).strip().splitlines() or [""])[0]
    return f"{type(inner).__name__}: {first}" if first else type(inner).__name__


def _causes(err: BaseException) -> list[BaseException]:
    """What Ray wrapped: a task's `cause`, or each Ray Train worker failure's."""
    failures = getattr(err, "worker_failures", None)
    wrapped = list(failures.values()) if failures else [err]
    return [getattr(w, "cause", None) or w for w in wrapped]


def fault_request(variable: str, example: str) -> tuple[int, tuple[int, ...]] | None:
    """A test-only fault-injection variable `ITERATION:N[,N...]` (e.g. the task indices or
    the rank to fail at that iteration) from the environment; None if unset. Not a config
    key: a user's config cannot turn it on, and a run's config.yaml never records it."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return None
    try:
        iteration, rest = text.split(":", 1)
        numbers = tuple(int(n) for n in rest.split(",") if n.strip())
        if not numbers:
            raise ValueError
        return int(iteration), numbers
    except ValueError:
        raise ConfigError(f"{variable}={text!r}: expected {example} (test-only fault injection)") from None
