"""Ray runner: source-task inner loops in `SourceTaskWorker` actors (DESIGN §6).

Same interface as `LocalRunner` (`run_tasks(params, specs) -> list[TaskResult]`,
`close()`), and each worker calls the very same `run_task`, so the driver's
softmax-rescaling and outer update are one code path for both runners.

Per iteration the driver `ray.put`s θ once and spreads the n task specs over the
workers: more tasks than workers queue, fewer leave workers idle. A task lost with
its worker (the actor process died) is re-run from its spec, which carries its own
seed, so a fault changes no result; the actor restarts (`max_restarts`). A task that
keeps failing stops the run after `ray.max_task_retries` retries with a clear error.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

import ray
import torch

from metarec.config import Config, config_from_dict
from metarec.errors import MetaRecError
from metarec.meta.run_task import TaskResult, run_task
from metarec.meta.tasks import TaskSpec


class WorkerFailedError(MetaRecError):
    """A source task failed on its workers more often than `ray.max_task_retries` allows."""


class SourceTaskWorker:
    """Loads the prepared domains once, then runs source tasks for the driver."""

    def __init__(self, cfg_json: dict[str, Any]):
        from metarec.train import build_problem, resolve_device

        cfg = config_from_dict(cfg_json, "driver config")
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
        device = resolve_device(cfg.train.device)
        self.ctx = build_problem(cfg, device).task_context()

    def run(self, params: dict[str, torch.Tensor], spec: TaskSpec, die: bool = False) -> TaskResult:
        if die:  # fault injection: the process dies mid-task, as on a lost node
            os._exit(1)
        params = {k: v.to(self.ctx.device) for k, v in params.items()}
        return run_task(params, spec, self.ctx)

    def pid(self) -> int:
        return os.getpid()


class RayRunner:
    def __init__(self, cfg: Config, *, init_address: str | None = None):
        self.cfg = cfg
        r = cfg.ray
        self.max_retries = r.max_task_retries
        remote_cls = ray.remote(
            num_cpus=r.cpus_per_worker,
            num_gpus=r.gpus_per_worker,
            max_restarts=max(1, r.max_task_retries + 1),
            max_task_retries=0,  # the driver re-runs lost tasks itself, from their specs
        )(SourceTaskWorker)
        strategy = _placement_strategy()
        options = {"scheduling_strategy": strategy} if strategy is not None else {}
        cfg_json = cfg.to_dict()
        self.workers = [remote_cls.options(**options).remote(cfg_json) for _ in range(r.num_workers)]
        self._injected: set[tuple[int, int]] = set()
        self.bytes_last_iteration = 0

    def _should_die(self, spec: TaskSpec) -> bool:
        r = self.cfg.ray
        key = (spec.iteration, spec.index)
        if r.fail_iteration == spec.iteration and spec.index in r.fail_task_once and key not in self._injected:
            self._injected.add(key)
            return True
        return False

    def run_tasks(self, params: dict[str, torch.Tensor], specs: list[TaskSpec]) -> list[TaskResult]:
        theta = {k: v.detach().cpu() for k, v in params.items()}
        self.bytes_last_iteration = sum(t.numel() * t.element_size() for t in theta.values())
        theta_ref = ray.put(theta)
        pending = deque(specs)
        attempts = {s.index: 0 for s in specs}
        in_flight: dict[ray.ObjectRef, tuple[int, TaskSpec]] = {}
        free = deque(range(len(self.workers)))
        results: dict[int, TaskResult] = {}
        while pending or in_flight:
            while pending and free:
                spec, w = pending.popleft(), free.popleft()
                ref = self.workers[w].run.remote(theta_ref, spec, self._should_die(spec))
                in_flight[ref] = (w, spec)
            done, _ = ray.wait(list(in_flight), num_returns=1)
            ref = done[0]
            w, spec = in_flight.pop(ref)
            free.append(w)
            try:
                result = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as err:
                attempts[spec.index] += 1
                if attempts[spec.index] > self.max_retries:
                    raise WorkerFailedError(
                        f"iteration {spec.iteration}: task {spec.index} (source {spec.source!r}) failed "
                        f"{attempts[spec.index]} times; last error: {type(err).__name__}"
                    ) from None
                pending.appendleft(spec)  # re-run from its spec: same seed, same result
                continue
            except ray.exceptions.RayTaskError as err:
                cause = err.as_instanceof_cause()
                if isinstance(cause, MetaRecError):
                    raise type(cause)(str(cause).splitlines()[-1]) from None
                raise
            results[spec.index] = result
            self.bytes_last_iteration += _result_bytes(result)
        return [results[s.index] for s in sorted(specs, key=lambda s: s.index)]

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []


def _result_bytes(result: TaskResult) -> int:
    tensors = list(result.meta_grad.values()) + list(result.source_delta.values())
    return sum(t.numel() * t.element_size() for t in tensors)


def _placement_strategy():
    """Inside a Tune trial, place workers in the trial's placement group."""
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = get_current_placement_group()
    if pg is None:
        return None
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_capture_child_tasks=True)


def connect(address: str | None) -> None:
    """Join `address` (auto or host:port), or start a local Ray instance bound to 127.0.0.1."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)


def ray_runner_factory(address: str | None = None):
    def factory(problem) -> RayRunner:
        connect(address)
        return RayRunner(problem.cfg)

    return factory
