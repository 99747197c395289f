"""Every private Ray API metarec uses, behind one version check.

Ray has no public API yet for these four needs; each use is one function here, and
each checks first that the installed Ray is one metarec was tested with
(`TESTED_RAY`, the same bound as `pyproject.toml`), failing with one clear line
otherwise rather than breaking in an unexpected way inside Ray:

- `reset_token_cache`: make this process see a token-auth setting changed after Ray was
  imported (`ray._raylet`);
- `single_machine_mode`: keep 127.0.0.1 as a private local instance's node IP
  (`ray._private.ray_constants.ENABLE_RAY_CLUSTER`, see metarec.ray.session);
- `autoscaler_max_resources`: what an autoscaling cluster may grow to
  (`ray._private.state`, the call Ray Train makes);
- `loopback_torch_config`: Ray Train's torch backend with a file rendezvous and gloo on
  the loopback device (`ray.train.torch.config._TorchBackend`,
  `_setup_torch_process_group`, `_set_torch_distributed_env_vars`).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import ray

from metarec.errors import MetaRecError

TESTED_RAY = ((2, 50), (2, 60))  # oldest and newest Ray (major, minor) tested; pyproject: ray>=2.50,<2.61


class UntestedRayError(MetaRecError):
    """The installed Ray is outside the versions whose private APIs metarec was tested with."""


def check_ray_version(version: str | None = None) -> None:
    """UntestedRayError (one line) unless `version` (default: the installed Ray's) is within TESTED_RAY."""
    version = version or ray.__version__
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        major_minor = (-1, -1)
    (lo_major, lo_minor), (hi_major, hi_minor) = TESTED_RAY
    if not (lo_major, lo_minor) <= major_minor <= (hi_major, hi_minor):
        raise UntestedRayError(
            f"Ray {version} is not one metarec was tested with ({lo_major}.{lo_minor} to {hi_major}.{hi_minor}); "
            f"metarec relies on private Ray APIs (metarec/ray/private.py): install 'ray[default,train,tune]>={lo_major}.{lo_minor},<{hi_major}.{hi_minor + 1}'"
        )


def reset_token_cache() -> None:
    """Ray caches its config and the auth token it loaded: make this process see the
    `RAY_AUTH_*` variables as they are now."""
    check_ray_version()
    from ray._raylet import AuthenticationTokenLoader
    from ray._raylet import Config as RayletConfig

    RayletConfig.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def single_machine_mode() -> Iterator[None]:
    """Ray's single-machine mode (`ENABLE_RAY_CLUSTER` off, as on macOS/Windows) for this
    process's `ray.init` only; the environment (and so `ray start`) is untouched."""
    check_ray_version()
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def autoscaler_max_resources() -> dict[str, float]:
    """The maxima of an autoscaling cluster's node groups ({} without an autoscaler)."""
    check_ray_version()
    from ray._private.state import state

    return dict(state.get_max_resources_from_cluster_config() or {})


def loopback_torch_config(scratch: str):
    """A `ray.train.torch.TorchConfig` whose process group rendezvous through a file in
    `scratch` (torch's TCPStore would listen on all interfaces) with gloo bound to the
    loopback device (`GLOO_SOCKET_IFNAME=lo`)."""
    check_ray_version()
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

    class _LoopbackTorchBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            store = os.path.join(scratch, f"pg-{uuid.uuid4().hex}")  # removed with `scratch` when the run ends
            worker_group.execute(os.environ.__setitem__, "GLOO_SOCKET_IFNAME", "lo")
            worker_group.execute(_set_torch_distributed_env_vars)
            ray.get([worker_group.execute_single_async(
                i, _setup_torch_process_group, backend="gloo", world_rank=i, world_size=len(worker_group),
                init_method=f"file://{store}", timeout_s=backend_config.timeout_s) for i in range(len(worker_group))])

    class LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return _LoopbackTorchBackend

    return LoopbackTorchConfig(backend="gloo")
