"""The whole training loop on Ray Train workers: data-parallel baselines and collective MetaRec.

`metarec train CONFIG --ray-train --workers N` (or `--ray` with `ray.mode: collective`)
runs the plain `Trainer` on N `ray.train.torch.TorchTrainer` workers that share one torch
process group (gloo on CPU, NCCL on GPU), each with the data-parallel strategy
`DataParallel` and the callback `RayTrainReport` (no subclass):

- target-only and joint training (`DataParallel`, metarec.ray.collective): every worker
  draws the same batch (same seeded RNG), takes its rows `rank::N`, and the gradients are
  averaged over the workers before the one clip + optimizer step, as DDP does (an
  explicit all-reduce, since the losses are computed functionally and never call a DDP
  module's forward). With N = 1 this is the local run, step for step;
- MetaRec: `CollectiveRunner` (metarec.ray.collective): each worker runs its tasks,
  the workers exchange the similarity scalars and all-reduce the weighted meta gradients,
  and every worker applies the same outer step.

Every worker holds a replica of θ and the optimizer and evaluates it (identical
replicas, so the early-stopping decisions agree); worker 0 writes the run directory
(the local run's layout, `metarec.run_dir`), the others a
scratch directory. After each step every worker calls `ray.train.report` with the step's
history row (`RayTrainReport`, a `metarec.callbacks.Callback`); at a step checkpoint
worker 0 attaches it as a `ray.train.Checkpoint` (the same safetensors + JSON
directory). The driver receives these metrics, never tensors.

Faults: `RunConfig(failure_config=FailureConfig(max_failures=ray.max_task_retries))`. When
a worker dies (or its node is lost), Ray Train restarts the worker group and
`ray.train.get_checkpoint()` hands the new workers the last reported checkpoint; resuming
is bit-identical (sampler, RNG and optimizer state), so the run ends as an unfaulted one
would. Test-only fault injection, read by the driver from the environment:
`METAREC_TEST_KILL_WORKER=ITERATION:RANK` makes worker RANK exit in the middle of iteration
ITERATION (after its own computation, before the collective), once: it leaves the marker
`OUT/ray_train/killed-ITERATION-RANK` first and never dies where that marker exists (a
local run directory). `METAREC_TEST_HOLD_WORKER=ITERATION:RANK` is the same with the marker
`held-ITERATION-RANK`, but the worker waits there (the whole group with it, in the
collective) to be killed with its node by the test, and exits after `HOLD_LIMIT_S` if it
is not. Which checkpoint the new group starts from is the last one Ray Train had
registered when the worker died.

Loopback. On the private local Ray instance (`connect(None)`) the process group is set up
by `metarec.ray.private.loopback_torch_config`: a FileStore rendezvous in the run's temporary
folder (torch's TCPStore would listen on all interfaces) and `GLOO_SOCKET_IFNAME=lo`, so
gloo's sockets bind 127.0.0.1.
On a cluster, Ray Train's default TCP rendezvous on the head worker's node IP is used.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from typing import Any

import ray
import torch

from metarec import fs
from metarec.callbacks import Callback
from metarec.checkpoint import load_checkpoint
from metarec.config import Config, config_from_dict
from metarec.errors import ConfigError
from metarec.problem import resolve_device
from metarec.ray.collective import CollectiveRunner, DataParallel
from metarec.ray.driver import WorkerFailedError
from metarec.ray.private import loopback_torch_config
from metarec.ray.session import error_line, fault_request, remove_at_shutdown, set_worker_threads, user_error, worker_config
from metarec.run_dir import RunDir
from metarec.train import Trainer

KILL_ENV = "METAREC_TEST_KILL_WORKER"  # test-only fault injection (module docstring)
HOLD_ENV = "METAREC_TEST_HOLD_WORKER"
HOLD_LIMIT_S = 600.0


# ------------------------------------------------------------------ process group


class ProcessGroupCollective:
    """`metarec.ray.collective.Collective` on torch.distributed's default group.

    Counts per call the payload bytes and the bytes a ring all-reduce sends per worker,
    2 (W − 1) / W × payload. `fault` (test-only, module docstring): (iteration, marker,
    seconds to hold before exiting).
    """

    def __init__(self, rank: int, world: int, device: torch.device, fault: tuple[int, str, float] | None = None):
        self.rank, self.world, self.device, self.fault = rank, world, device, fault
        self.payload_bytes = 0
        self.ring_bytes = 0.0

    def all_reduce(self, tensor: torch.Tensor, iteration: int) -> None:
        if self.fault is not None and self.fault[0] == iteration and not os.path.exists(self.fault[1]):
            with open(self.fault[1], "w"):
                pass
            time.sleep(self.fault[2])  # held: until the test kills this worker's node
            os._exit(1)  # a worker lost mid-iteration, as on a lost node
        if self.world == 1:
            return
        import torch.distributed as dist

        dist.all_reduce(tensor)
        size = tensor.numel() * tensor.element_size()
        self.payload_bytes += size
        self.ring_bytes += 2 * (self.world - 1) / self.world * size


# ------------------------------------------------------------------ the trainer on a worker


class RayTrainReport(Callback):
    """A worker's steps, in its history rows and to Ray Train: each row gets the step's
    time, the bytes of the collective `comm` and, in the first step after Ray Train
    restarted the worker group (`restarted`), `worker_replacements`; then every worker
    reports the row with `ray.train.report`, worker 0 with the step checkpoint when one
    was saved."""

    def __init__(self, comm: ProcessGroupCollective, restarted: bool = False):
        self.comm = comm
        self.restarted = restarted
        self._start, self._ring_bytes, self._payload_bytes = 0.0, 0.0, 0

    def on_step_begin(self, step: int, trainer: Trainer) -> None:
        self._start, self._ring_bytes, self._payload_bytes = time.perf_counter(), self.comm.ring_bytes, self.comm.payload_bytes

    def on_step_row(self, row: dict[str, Any], trainer: Trainer) -> None:
        row["step_seconds"] = time.perf_counter() - self._start
        row["bytes_per_worker"] = self.comm.ring_bytes - self._ring_bytes
        row["collective_payload_bytes"] = self.comm.payload_bytes - self._payload_bytes
        if self.restarted:  # Ray Train replaced the whole worker group before this step
            row["worker_replacements"], self.restarted = self.comm.world, False

    def on_step_end(self, row: dict[str, Any], trainer: Trainer) -> None:
        every = trainer.cfg.train.checkpoint_every
        checkpoint = None
        if self.comm.rank == 0 and every and row["step"] % every == 0:
            tag = trainer.run.step_uri(row["step"])
            checkpoint = ray.train.Checkpoint(tag) if fs.is_uri(tag) else ray.train.Checkpoint.from_directory(tag)
        row["bytes_to_driver"] = len(json.dumps(row)) + 32  # the report's metrics, as JSON (+ this key)
        start = time.perf_counter()
        ray.train.report(row, checkpoint=checkpoint)
        row["report_seconds"] = time.perf_counter() - start  # in the run's history, not in the report


def restore_worker(trainer: Trainer, run_dir: str, resume: bool) -> bool:
    """Before `fit`: after Ray Train restarted the worker group, its last reported
    checkpoint; else, with `resume` (--resume), the newest step checkpoint of the run
    directory `run_dir` (worker 0's, on every worker). True after a restart."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as path:
            trainer.restore(load_checkpoint(path), ckpt.path, where=run_dir)
        return True
    if resume:
        trainer.resume(RunDir(run_dir))
    return False


def train_loop(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker."""
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cfg = config_from_dict(loop_config["config"], "Ray Train worker config")
    set_worker_threads(cfg.ray.cpus_per_worker)
    fault = loop_config.get("fault")  # (what, iteration, rank)
    fault_at = None
    if fault and fault[2] == rank:
        fault_at = (fault[1], _marker(loop_config["out"], *fault), HOLD_LIMIT_S if fault[0] == "held" else 0.0)
    scratch = None
    if rank != 0:  # a run directory of its own, inside the driver's scratch folder
        os.makedirs(loop_config["scratch"], exist_ok=True)  # (on another node of a cluster it is not there yet)
        scratch = tempfile.mkdtemp(prefix=f"rank{rank}-", dir=loop_config["scratch"])
    device = resolve_device(cfg.train.device)
    comm_device = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    comm = ProcessGroupCollective(rank, world, comm_device, fault_at)
    try:
        report = RayTrainReport(comm)
        trainer = Trainer.from_config(cfg, loop_config["out"] if rank == 0 else scratch,
                                      lambda problem: CollectiveRunner(problem.task_context(), comm),
                                      strategy=DataParallel(comm), callbacks=[report])
        report.restarted = restore_worker(trainer, loop_config["out"], loop_config["resume"])
        trainer.fit()
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------ the driver


def _fault_request() -> tuple[str, int, int] | None:
    """(what, iteration, rank) of the test-only fault injection (module docstring): what is
    'killed' (`KILL_ENV`) or 'held' (`HOLD_ENV`); None if neither is set."""
    for what, variable in (("killed", KILL_ENV), ("held", HOLD_ENV)):
        request = fault_request(variable, "ITERATION:RANK, e.g. 1:1")
        if request is None:
            continue
        iteration, ranks = request
        if len(ranks) != 1:
            raise ConfigError(f"{variable}: expected ITERATION:RANK, e.g. 1:1, one rank (test-only fault injection)")
        return what, iteration, ranks[0]
    return None


def _marker(out_dir: str, what: str, iteration: int, rank: int) -> str:
    return os.path.join(storage_for(out_dir), f"{what}-{iteration}-{rank}")


def kill_marker(out_dir: str, iteration: int, rank: int) -> str:
    """The marker of `METAREC_TEST_KILL_WORKER` (module docstring)."""
    return _marker(out_dir, "killed", iteration, rank)


def hold_marker(out_dir: str, iteration: int, rank: int) -> str:
    """The marker of `METAREC_TEST_HOLD_WORKER` (module docstring)."""
    return _marker(out_dir, "held", iteration, rank)


def storage_for(out_dir: str) -> str:
    """Where Ray Train keeps its copies of the reported checkpoints: `OUT/ray_train`."""
    return f"{out_dir}/ray_train" if fs.is_uri(out_dir) else os.path.abspath(os.path.join(out_dir, "ray_train"))


def fit_with_ray_train(cfg: Config, out_dir: str, *, local: bool, resume: bool = False) -> dict[str, Any]:
    """Run `cfg` on `cfg.ray.num_workers` Ray Train workers (connected to Ray already; `local`:
    the private loopback instance); returns the final metrics worker 0 wrote to the run directory OUT."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    r = cfg.ray
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
    run_dir = out_dir if fs.is_uri(out_dir) else os.path.abspath(out_dir)
    if not fs.is_uri(run_dir):
        os.makedirs(storage_for(run_dir), exist_ok=True)
    # the rendezvous file and the scratch run directories of workers 1..W-1: one folder,
    # removed when the run ends however it ends (a killed worker cannot clean up after itself);
    # on the local instance a hidden temp entry of the run directory, so that the next start
    # removes what a killed driver left (`metarec.run_dir.clean_stale_temp`)
    if local and not fs.is_uri(run_dir):
        scratch = os.path.join(run_dir, f".ray-train-scratch.tmp-{uuid.uuid4().hex}")
        os.makedirs(scratch)
    else:
        scratch = tempfile.mkdtemp(prefix="metarec-ray-train-")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": worker_config(cfg), "out": run_dir, "resume": resume, "fault": _fault_request(),
                           "scratch": scratch},
        torch_config=loopback_torch_config(scratch) if local else TorchConfig(),
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.gpus_per_worker > 0, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_for(out_dir),
            failure_config=FailureConfig(max_failures=r.max_task_retries),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
    )
    try:
        trainer.fit()
    except Exception as err:  # noqa: BLE001 - Ray Train wraps the workers' errors; show the first one
        _raise_worker_error(err)
    finally:  # now, and again once Ray's processes are gone (a worker may still be writing there)
        shutil.rmtree(scratch, ignore_errors=True)
        remove_at_shutdown(scratch)
    return RunDir(out_dir).read_metrics()


def _raise_worker_error(err: Exception) -> None:
    cause = user_error(err)
    if cause is not None:
        raise cause from None
    raise WorkerFailedError(f"Ray Train run failed: {error_line(err)}") from None
