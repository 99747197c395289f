"""The collective meta update gives the driver runner's result (docs/design.md §6).

First without Ray (W workers as threads around an exact in-process sum), then on Ray
Train's gloo process group in a private loopback Ray instance: 3 iterations with 2 and 3
workers against the driver runner (RayRunner), and a worker killed mid-iteration.
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import torch

import metarec.ray.collective as collective
from metarec.checkpoint import load_checkpoint
from metarec.config import config_from_dict
from metarec.ray.collective import CollectiveRunner
from metarec.ray.driver import ray_runner_factory
from metarec.train import Trainer, train

ITERATIONS = 3



@pytest.fixture(scope="module")
def root(tiny_domains_module) -> str:
    return tiny_domains_module


def tiny_config(root: str, **ray_options):
    return config_from_dict({
        "seed": 3,
        "data": {"root": root, "target": "target", "sources": ["src-a", "src-b"], "max_len": 6},
        "model": {"hidden": 16, "blocks": 1},
        "train": {"batch_size": 8, "device": "cpu", "progress": False, "max_steps": ITERATIONS,
                  "eval_every": ITERATIONS, "checkpoint_every": 1},
        "vq": {"heads": 2},
        "meta": {"tasks_per_iter": 3},
        "ray": {"cpus_per_worker": 0.5, **ray_options},
    })


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")


def assert_same_weights(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) == ITERATIONS
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and len(w) == 2
        for source in w:
            assert g[source] == pytest.approx(w[source], abs=1e-6, rel=0)


# ------------------------------------------------------------------ without Ray


class ThreadSum:
    """`Collective` for W threads of one process: an exact sum in rank order."""

    def __init__(self, world: int):
        self.barrier = threading.Barrier(world, timeout=120)
        self.slots: list[torch.Tensor | None] = [None] * world

    def member(self, rank: int):
        group = self

        class Member:
            def __init__(self):
                self.rank, self.world, self.device = rank, len(group.slots), torch.device("cpu")

            def all_reduce(self, tensor: torch.Tensor, iteration: int) -> None:
                group.barrier.wait()
                group.slots[rank] = tensor.clone()
                group.barrier.wait()
                total = group.slots[0].clone()
                for part in group.slots[1:]:
                    total += part
                group.barrier.wait()
                tensor.copy_(total)

        return Member()


def in_threads(world: int, worker, timeout: float) -> None:
    """`worker(rank)` for every rank, each in its own thread; returns when all are joined
    (or `timeout` seconds each have passed)."""
    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)


def steps(cfg, factory=None, lock=None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    with lock or threading.Lock():  # the model's seeded init uses torch's global RNG
        trainer = Trainer.from_config(cfg, "unused", factory)
    rows = [trainer.step(it) for it in range(ITERATIONS)]
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, [r["weights"] for r in rows]


@pytest.mark.parametrize("world", [2, 3])
def test_collective_update_equals_the_driver_update_in_threads(root, world, monkeypatch):
    want_params, want_weights = steps(tiny_config(root))
    lock = threading.Lock()
    real = collective.run_task

    def one_at_a_time(*args):  # run_task seeds torch's global RNG: threads take turns
        with lock:
            return real(*args)

    monkeypatch.setattr(collective, "run_task", one_at_a_time)
    group, out = ThreadSum(world), [None] * world

    def worker(rank: int) -> None:
        comm = group.member(rank)
        out[rank] = steps(tiny_config(root), lambda problem: CollectiveRunner(problem.task_context(), comm), lock)

    in_threads(world, worker, timeout=300)
    for rank in range(world):
        assert out[rank] is not None, f"worker {rank} did not finish"
        assert_close(out[rank][0], want_params)
        assert_same_weights(out[rank][1], want_weights)


def test_data_parallel_takes_its_rows_and_averages_the_gradients_in_threads():
    """`DataParallel` (the Trainer's strategy on Ray Train): worker r takes rows r::W, and
    after `sync_grads` every worker holds the mean of the workers' gradients."""
    world, group = 2, ThreadSum(2)
    grads = [[torch.full((2, 3), float(rank + 1)), torch.arange(4.0) * (rank + 1)] for rank in range(world)]
    params = [[torch.nn.Parameter(torch.zeros_like(g)) for g in grads[rank]] + [torch.nn.Parameter(torch.zeros(1))]
              for rank in range(world)]  # the last one has no gradient: left alone
    strategies = [collective.DataParallel(group.member(rank)) for rank in range(world)]

    def worker(rank: int) -> None:
        for p, g in zip(params[rank], grads[rank]):
            p.grad = g.clone()
        strategies[rank].sync_grads(params[rank], step=0)

    in_threads(world, worker, timeout=120)
    for rank in range(world):
        assert torch.equal(params[rank][0].grad, torch.full((2, 3), 1.5))
        assert torch.equal(params[rank][1].grad, torch.arange(4.0) * 1.5)
        assert params[rank][2].grad is None
    rows = np.arange(7)
    assert [strategies[rank].shard(rows).tolist() for rank in range(world)] == [[0, 2, 4, 6], [1, 3, 5]]


# ------------------------------------------------------------------ on Ray Train


def run_result(out: str, step: int = ITERATIONS) -> tuple[dict[str, torch.Tensor], list[dict], dict]:
    """(parameters at `step`, history rows, metrics.json) of a run directory."""
    params = load_checkpoint(f"{out}/checkpoints/step-{step:08d}").params
    with open(f"{out}/history.jsonl") as f:
        rows = [json.loads(line) for line in f]
    with open(f"{out}/metrics.json") as f:
        metrics = json.load(f)
    return params, rows, metrics


@pytest.fixture(scope="module")
def driver_run(private_ray, root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("driver") / "run")
    train(tiny_config(root, num_workers=2), out, runner_factory=ray_runner_factory())
    return run_result(out)


@pytest.fixture(scope="module")
def collective_runs(private_ray, root, tmp_path_factory):
    """{workers: run result} of unfaulted collective runs, computed on first use."""
    from metarec.ray.ray_train import fit_with_ray_train

    cache = {}

    def get(world: int):
        if world not in cache:
            out = str(tmp_path_factory.mktemp(f"collective{world}") / "run")
            fit_with_ray_train(tiny_config(root, mode="collective", num_workers=world), out, local=True)
            cache[world] = run_result(out)
        return cache[world]

    return get


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_collective_runner_equals_the_driver_runner(driver_run, collective_runs, world):
    params, rows, metrics = collective_runs(world)
    want_params, want_rows, want_metrics = driver_run
    assert_close(params, want_params)
    assert_same_weights([r["weights"] for r in rows], [r["weights"] for r in want_rows])
    assert metrics["steps"] == ITERATIONS and metrics["worker_replacements"] == 0
    assert metrics["val"]["NDCG@10"] == pytest.approx(want_metrics["val"]["NDCG@10"], abs=1e-6)


@pytest.mark.ray
def test_the_driver_receives_metrics_not_gradients(collective_runs, root):
    """Each step's report to the driver is its JSON history row: far below θ's size, while
    the workers' all-reduce carries the gradients (2 (W-1)/W x the summed buffer each)."""
    _, rows, _ = collective_runs(2)
    theta_bytes = sum(p.numel() * p.element_size() for p in Trainer.from_config(tiny_config(root), "unused").model.parameters())
    for row in rows:
        assert 0 < row["bytes_to_driver"] < 0.01 * theta_bytes * 3  # the driver runner gets >= 3 task results
        assert row["bytes_per_worker"] > 0.5 * row["collective_payload_bytes"] > 0


@pytest.mark.ray
@pytest.mark.slow
def test_a_worker_killed_mid_iteration_resumes_from_the_last_checkpoint(private_ray, root, collective_runs, tmp_path, monkeypatch):
    from metarec.ray.ray_train import KILL_ENV, fit_with_ray_train, kill_marker

    monkeypatch.setenv(KILL_ENV, "2:1")  # worker 1 exits in iteration 2, after its task, before the all-gather
    out = str(tmp_path / "run")
    fit_with_ray_train(tiny_config(root, mode="collective", num_workers=2), out, local=True)
    params, rows, metrics = run_result(out)
    assert os.path.exists(kill_marker(out, 2, 1))  # worker 1 did die
    # the group restarted from the last checkpoint Ray Train had registered (step 1 or 2)
    assert [r["step"] for r in rows] == [1, 2, 3] and metrics["steps"] == ITERATIONS
    want_params, want_rows, _ = collective_runs(2)
    assert_close(params, want_params)
    assert_same_weights([r["weights"] for r in rows], [r["weights"] for r in want_rows])
