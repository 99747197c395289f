"""The driver runner: source-task inner loops in `SourceTaskWorker` actors (docs/design.md §6).

Same interface as `LocalRunner` (`run_tasks(params, specs) -> list[TaskResult]`
sorted by task index, `close()`), and each worker calls the very same `run_task`, so
the driver's softmax-rescaling and outer update are one code path for both runners.

Per iteration the driver `ray.put`s θ once and spreads the n task specs over the
workers: more tasks than workers queue, fewer leave workers idle. Results come back
to the driver, which sorts them by task index; `bytes_last_iteration` counts θ once
plus the returned tensors.

Faults. A task whose worker died (process killed, node lost, `ray.kill`), whose result
was lost before the driver fetched it (it lived in the object store of a node that was
lost), or that ran past `task_timeout_s` is re-run from its spec, which carries its own
seed, so a fault changes no result. The failed worker is replaced by a fresh actor in
the same slot (and the same placement group inside a Tune trial); the driver does this itself
rather than through Ray's `max_restarts`, so it never has to guess whether a handle
is restarting or gone. A task that fails more than `ray.max_task_retries` times stops
the run with `WorkerFailedError`. Errors raised *by* a task (a `MetaRecError` such as
`NonFiniteError`, or a worker that cannot load its data) are not retried: they are
re-raised on the driver as the original error.

Fault injection (tests only): `METAREC_TEST_FAIL_TASK_ONCE=ITERATION:INDEX[,INDEX...]`
in the driver's environment makes the workers that run those tasks of that iteration die
mid-task, once each (`os._exit`), as on a lost node. It is not a config key: a user's
config cannot turn it on, and a run's `config.yaml` never records it.

Joining Ray (token authentication, the loopback-only local instance): metarec.ray.session.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from typing import Any

import ray
import torch

from metarec.config import Config, config_from_dict
from metarec.errors import MetaRecError
from metarec.meta.run_task import TaskResult, run_task
from metarec.meta.tasks import TaskSpec
from metarec.problem import build_problem, resolve_device
from metarec.ray.session import connect, error_line, fault_request, set_worker_threads, user_error, worker_config


FAIL_TASK_ONCE_ENV = "METAREC_TEST_FAIL_TASK_ONCE"
# a task's worker or its result is gone (module docstring): re-run the task on a fresh worker
LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError)


class WorkerFailedError(MetaRecError):
    """Workers could not start, or a task failed more often than `ray.max_task_retries` allows."""


class SourceTaskWorker:
    """Loads the prepared domains once, then runs source tasks for the driver.

    A user-facing error while loading (missing domain, bad config) is kept and raised
    by every call, so the driver sees the original error instead of a dead actor.
    """

    def __init__(self, cfg_json: dict[str, Any]):
        self.init_error: MetaRecError | None = None
        try:
            cfg = config_from_dict(cfg_json, "driver config")
            set_worker_threads(cfg.ray.cpus_per_worker)
            self.ctx = build_problem(cfg, resolve_device(cfg.train.device)).task_context()
        except MetaRecError as err:
            self.init_error = err

    def ready(self) -> int:
        if self.init_error is not None:
            raise self.init_error
        return os.getpid()

    def run(self, params: dict[str, torch.Tensor], spec: TaskSpec, die: bool = False) -> TaskResult:
        if self.init_error is not None:
            raise self.init_error
        if die:  # fault injection: the process dies mid-task, as on a lost node
            os._exit(1)
        params = {k: v.to(self.ctx.device) for k, v in params.items()}
        return run_task(params, spec, self.ctx)


class RayRunner:
    """Runs each iteration's tasks on `ray.num_workers` `SourceTaskWorker` actors.

    `start_timeout_s` bounds the wait for the workers to be placed and load their
    data; `task_timeout_s` bounds one task (a task past it counts as failed).
    After `run_tasks`: `bytes_last_iteration` (θ once + result tensors),
    `last_assignment` (task index -> worker slot), `worker_replacements` (total).
    """

    def __init__(self, cfg: Config, *, start_timeout_s: float = 600.0, task_timeout_s: float = 3600.0):
        self.cfg = cfg
        r = cfg.ray
        self.max_retries = r.max_task_retries
        self.task_timeout_s = task_timeout_s
        self._actor_cls = ray.remote(
            num_cpus=r.cpus_per_worker,
            num_gpus=r.gpus_per_worker,
            max_restarts=0,  # the driver replaces dead workers itself (module docstring)
            max_task_retries=0,  # and re-runs lost tasks from their specs
        )(SourceTaskWorker)
        strategy = _placement_strategy()
        self._options = {"scheduling_strategy": strategy} if strategy is not None else {}
        self._cfg_json = worker_config(cfg)
        self.workers = [self._spawn() for _ in range(r.num_workers)]
        self._fail_once = injected_faults()
        self._injected: set[tuple[int, int]] = set()
        self.bytes_last_iteration = 0
        self.last_assignment: dict[int, int] = {}
        self.worker_replacements = 0
        self._wait_ready(start_timeout_s)

    def _spawn(self):
        return self._actor_cls.options(**self._options).remote(self._cfg_json)

    def _wait_ready(self, timeout_s: float) -> None:
        r = self.cfg.ray
        try:
            ray.get([w.ready.remote() for w in self.workers], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise WorkerFailedError(
                f"{r.num_workers} Ray workers ({r.cpus_per_worker} CPU, {r.gpus_per_worker} GPU each) "
                f"did not start within {timeout_s:.0f} s; cluster resources: {ray.cluster_resources()}"
            ) from None
        except ray.exceptions.RayTaskError as err:
            self.close()
            _raise_user_error(err)
            raise
        except ray.exceptions.RayActorError as err:
            self.close()
            raise WorkerFailedError(f"a Ray worker died while starting: {error_line(err)}") from None

    def _replace(self, slot: int, spec: TaskSpec, why: str) -> None:
        """Kill the worker in `slot` (if it still lives) and start a fresh one there; say so in one line."""
        ray.kill(self.workers[slot], no_restart=True)
        self.workers[slot] = self._spawn()
        self.worker_replacements += 1
        print(f"replaced Ray worker in slot {slot} (iteration {spec.iteration}, task {spec.index}, "
              f"source {spec.source!r}): {why}", file=sys.stderr, flush=True)

    def _should_die(self, spec: TaskSpec) -> bool:
        key = (spec.iteration, spec.index)
        if key in self._fail_once and key not in self._injected:
            self._injected.add(key)
            return True
        return False

    def run_tasks(self, params: dict[str, torch.Tensor], specs: list[TaskSpec]) -> list[TaskResult]:
        theta = {k: v.detach().cpu() for k, v in params.items()}
        self.bytes_last_iteration = tensor_bytes(theta.values())
        self.last_assignment = {}
        theta_ref = ray.put(theta)
        pending = deque(specs)
        attempts = {s.index: 0 for s in specs}
        in_flight: dict[ray.ObjectRef, tuple[int, TaskSpec, float]] = {}
        free = deque(range(len(self.workers)))
        results: dict[int, TaskResult] = {}
        while pending or in_flight:
            while pending and free:
                spec, slot = pending.popleft(), free.popleft()
                ref = self.workers[slot].run.remote(theta_ref, spec, self._should_die(spec))
                in_flight[ref] = (slot, spec, time.monotonic() + self.task_timeout_s)
            next_deadline = min(deadline for _, _, deadline in in_flight.values())
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=max(0.0, next_deadline - time.monotonic()))
            if not done:  # the oldest task ran past task_timeout_s: treat its worker as lost
                ref = min(in_flight, key=lambda k: in_flight[k][2])
                slot, spec, _ = in_flight.pop(ref)
                why = f"no result within task_timeout_s={self.task_timeout_s:g} s"
                self._retry(spec, attempts, why)
                self._replace(slot, spec, why)
                pending.appendleft(spec)
                free.append(slot)
                continue
            ref = done[0]
            slot, spec, _ = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except LOST as err:
                why = error_line(err)
                self._retry(spec, attempts, why)
                self._replace(slot, spec, why)
                pending.appendleft(spec)  # re-run from its spec: same seed, same result
                free.append(slot)
                continue
            except ray.exceptions.RayTaskError as err:
                _raise_user_error(err)
                raise
            free.append(slot)
            results[spec.index] = result
            self.last_assignment[spec.index] = slot
            self.bytes_last_iteration += result_bytes(result)
        return [results[s.index] for s in sorted(specs, key=lambda s: s.index)]

    def _retry(self, spec: TaskSpec, attempts: dict[int, int], why: str) -> None:
        """Count a failed attempt of `spec`; raise WorkerFailedError once it exceeds the retries."""
        attempts[spec.index] += 1
        if attempts[spec.index] > self.max_retries:
            raise WorkerFailedError(
                f"iteration {spec.iteration}: task {spec.index} (source {spec.source!r}) failed "
                f"{attempts[spec.index]} times (ray.max_task_retries = {self.max_retries}); last error: {why}"
            )

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []


def injected_faults() -> frozenset[tuple[int, int]]:
    """(iteration, task index) pairs of `METAREC_TEST_FAIL_TASK_ONCE` (module docstring); empty if unset."""
    request = fault_request(FAIL_TASK_ONCE_ENV, "ITERATION:INDEX[,INDEX...], e.g. 1:0,2")
    if request is None:
        return frozenset()
    iteration, indices = request
    return frozenset((iteration, i) for i in indices)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def result_bytes(result: TaskResult) -> int:
    """Bytes of the tensors a task sends back (meta gradients and source deltas)."""
    return tensor_bytes([*result.meta_grad.values(), *result.source_delta.values(), *result.source_grad.values()])


def _raise_user_error(err: ray.exceptions.RayTaskError) -> None:
    """Raise the original MetaRecError a task raised (no Ray traceback wrapper)."""
    cause = user_error(err)
    if cause is not None:
        raise cause from None


def _placement_strategy():
    """Inside a Tune trial, place workers in the trial's placement group."""
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = get_current_placement_group()
    if pg is None:
        return None
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_capture_child_tasks=True)


def ray_runner_factory(address: str | None = None):
    """`train(runner_factory=...)` / `Trainer.from_config`: connect (or start Ray), then a RayRunner for the run's config."""

    def factory(problem) -> RayRunner:
        connect(address)
        return RayRunner(problem.cfg)

    return factory
