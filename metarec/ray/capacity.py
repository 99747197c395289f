"""Can the Ray cluster place the run's `SourceTaskWorker` actors? Checked before training.

`metarec train --ray` asks for `ray.num_workers` actors of `ray.cpus_per_worker` CPUs
(and `ray.gpus_per_worker` GPUs) each. Ray would wait for resources that never come
(the runner gives up after 600 s), so the CLI compares the request with the cluster's
total resources first:

- a local Ray instance (`--ray` without `--ray-address`) is this machine: the run gets
  min(ray.num_workers, what fits), with a one-line notice when that lowers it, and fails
  only if not even one worker fits;
- a cluster (`--ray-address`, or `RAY_ADDRESS`) is not second-guessed: a request larger
  than its total resources fails at once, naming the numbers and the
  `--set ray.num_workers=N` that would fit. An autoscaling cluster (cluster/*.yaml start
  with no GPU workers) counts what its autoscaler may add: the larger of the current
  totals and the maxima of its node groups.
"""

from __future__ import annotations

import math
from typing import Any

from metarec.config import RayConfig
from metarec.errors import ConfigError
from metarec.ray.private import autoscaler_max_resources

_EPS = 1e-9


def workers_that_fit(ray_cfg: RayConfig, resources: dict[str, Any]) -> int:
    """How many workers of `ray_cfg`'s size the total `resources` ({"CPU": .., "GPU": ..}) hold."""
    fit = math.floor(float(resources.get("CPU", 0.0)) / ray_cfg.cpus_per_worker + _EPS)
    if ray_cfg.gpus_per_worker > 0:
        fit = min(fit, math.floor(float(resources.get("GPU", 0.0)) / ray_cfg.gpus_per_worker + _EPS))
    return max(fit, 0)


def _describe(ray_cfg: RayConfig, resources: dict[str, Any]) -> tuple[str, str]:
    """('3 workers x 1 CPU = 3 CPUs', '2 CPUs, 0 GPUs'): the request and the cluster's totals."""
    n, cpu, gpu = ray_cfg.num_workers, ray_cfg.cpus_per_worker, ray_cfg.gpus_per_worker
    need = f"ray.num_workers={n} x ray.cpus_per_worker={cpu:g} = {n * cpu:g} CPUs"
    if gpu > 0:
        need += f" and x ray.gpus_per_worker={gpu:g} = {n * gpu:g} GPUs"
    have = f"{float(resources.get('CPU', 0.0)):g} CPUs, {float(resources.get('GPU', 0.0)):g} GPUs"
    return need, have


def plan_workers(ray_cfg: RayConfig, resources: dict[str, Any], *, local: bool, where: str = "the Ray cluster") -> tuple[int, str | None]:
    """(num_workers to use, a one-line notice or None); ConfigError if the request cannot be placed."""
    fit = workers_that_fit(ray_cfg, resources)
    if ray_cfg.num_workers <= fit:
        return ray_cfg.num_workers, None
    need, have = _describe(ray_cfg, resources)
    if fit < 1:
        raise ConfigError(f"{need} cannot be placed: {where} has {have}, not enough for one worker; "
                          f"lower ray.cpus_per_worker / ray.gpus_per_worker")
    if local:
        return fit, (f"note: {where} has {have}: using ray.num_workers={fit} instead of {ray_cfg.num_workers} "
                     f"(--set ray.num_workers={fit} silences this)")
    raise ConfigError(f"{need} cannot be placed: {where} has {have} in all; --set ray.num_workers={fit} would fit")


def cluster_capacity() -> dict[str, float]:
    """Connected to Ray: its total resources, raised to the autoscaler's maxima where it has one."""
    import ray

    totals = {k: float(v) for k, v in ray.cluster_resources().items()}
    try:  # no public API for the autoscaler's limits yet (Ray Train uses the same call)
        limits = autoscaler_max_resources()
    except Exception:  # noqa: BLE001 - an untested Ray, or one without it: current totals only
        limits = {}
    for key, value in limits.items():
        totals[key] = max(totals.get(key, 0.0), float(value))
    return totals


def fit_ray_workers(cfg, *, local: bool, where: str) -> str | None:
    """Connected to Ray: set `cfg.ray.num_workers` per `plan_workers` from the cluster's
    capacity; returns the notice (or None). ConfigError if nothing fits."""
    n, notice = plan_workers(cfg.ray, cluster_capacity(), local=local, where=where)
    cfg.ray.num_workers = n
    return notice
