"""What Ray costs per meta iteration: the local runner vs the Ray runner with 1 and 2 workers.

Same config, same seeds, so every runner performs the very same tasks (same specs, same
θ, same update). Per runner: warm-up iterations (not timed: first-touch allocation,
worker start), then timed outer iterations of the real `Trainer.step` (task sampling,
`run_tasks`, softmax-rescaled outer update). Reported per iteration:

- seconds_per_iteration, and overhead vs local (`seconds / local seconds - 1`);
- task_seconds: time inside `run_task` summed over tasks; critical_path_seconds: the
  busiest worker's `run_task` time (local: all tasks); outside_run_task_share:
  `1 - critical_path / iteration` = driver time not covered by `run_task`;
- bytes_per_iteration: θ put once into the object store + the tensors the tasks send
  back (`RayRunner.bytes_last_iteration`; 0 for the local runner).

Every runner computes with `--threads` torch threads per worker (default 1; the local
runner and the driver too): ray_1 then does exactly the local runner's work, so its
overhead is the price of Ray alone, and ray_2 runs two such workers side by side. (On a
shared, loaded 2-core machine multi-threaded torch collapses: a first try with 2
threads measured 18 s per local iteration against 2.4 s for two 1-thread workers.)

    python benchmarks/ray_overhead.py                       # reference-like problem, small budget
    python benchmarks/ray_overhead.py --iterations 10 --target-users 31013
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from common import header, prepare_shared_data, write_results

from metarec.config import config_from_dict
from metarec.runners.ray_runner import RayRunner, connect, tensor_bytes
from metarec.train import Trainer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="amazon-video-games")
    p.add_argument("--sources", nargs="+", default=["amazon-sports", "yelp"])
    p.add_argument("--target-users", type=int, default=3000, help="seeded target subsample (item space stays whole)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tasks", type=int, default=3, help="tasks per iteration (n)")
    p.add_argument("--source-negatives", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (and of the local runner)")
    return p.parse_args()


def bench_config(args, root: str, runner: str) -> dict:
    ray_options = {"ray_1": {"num_workers": 1, "cpus_per_worker": args.threads}, "ray_2": {"num_workers": 2, "cpus_per_worker": args.threads}}
    return {
        "name": "ray_overhead",
        "seed": 0,
        "data": {"root": root, "target": args.target, "sources": args.sources, "max_len": 50, "target_users": args.target_users},
        "model": {"backbone": "lru", "hidden": 64, "blocks": 2, "dropout": 0.2},
        "train": {"batch_size": args.batch_size, "source_negatives": args.source_negatives, "device": "cpu", "progress": False},
        "meta": {"tasks_per_iter": args.tasks},
        "ray": ray_options.get(runner, {"num_workers": 1}),
    }


class TimedRunner:
    """Wraps a runner: wall time of run_tasks and the per-task results of the last call."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds = 0.0
        self.results = []

    def run_tasks(self, params, specs):
        start = time.perf_counter()
        self.results = self.inner.run_tasks(params, specs)
        self.seconds = time.perf_counter() - start
        return self.results

    def close(self):
        self.inner.close()


def measure(args, root: str, runner: str) -> dict:
    cfg = config_from_dict(bench_config(args, root, runner), f"benchmark config ({runner})")
    if runner == "local":
        factory = None
    else:
        connect(None)
        factory = lambda problem: RayRunner(problem.cfg)  # noqa: E731
    trainer = Trainer.from_config(cfg, "unused", factory)
    timed = TimedRunner(trainer.runner)
    trainer.runner = timed
    theta_bytes = tensor_bytes(p.detach() for p in trainer.model.parameters())
    rows = []
    try:
        for it in range(args.warmup + args.iterations):
            start = time.perf_counter()
            trainer.step(it)
            seconds = time.perf_counter() - start
            if it < args.warmup:
                continue
            task_seconds = [r.stats["seconds"] for r in timed.results]
            assignment = getattr(timed.inner, "last_assignment", {r.index: 0 for r in timed.results})
            busy: dict[int, float] = {}
            for r in timed.results:
                busy[assignment[r.index]] = busy.get(assignment[r.index], 0.0) + r.stats["seconds"]
            moved = getattr(timed.inner, "bytes_last_iteration", 0)  # the local runner moves nothing
            rows.append({"seconds": seconds, "run_tasks": timed.seconds, "tasks": sum(task_seconds), "critical": max(busy.values()), "bytes": moved})
    finally:
        timed.close()
    mean = {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}
    return {
        "runner": runner,
        "workers": 1 if runner == "local" else cfg.ray.num_workers,
        "threads_per_worker": args.threads,
        "seconds_per_iteration": mean["seconds"],
        "seconds_spread": max(r["seconds"] for r in rows) - min(r["seconds"] for r in rows),
        "run_tasks_seconds": mean["run_tasks"],
        "task_seconds": mean["tasks"],
        "critical_path_seconds": mean["critical"],
        "outside_run_task_seconds": mean["seconds"] - mean["critical"],
        "outside_run_task_share": 1 - mean["critical"] / mean["seconds"],
        "bytes_per_iteration": int(mean["bytes"]),
        "theta_bytes": theta_bytes,
        "device": str(trainer.problem.device),
    }


def projection(rows: list[dict], n: int) -> list[str]:
    """Markdown notes: what grows with the number of workers, from the measured numbers."""
    local, ray1 = rows[0], rows[1]
    theta_mib = local["theta_bytes"] / 2**20
    per_task_mib = (ray1["bytes_per_iteration"] - ray1["theta_bytes"]) / 2**20 / n
    ray_cost_s = ray1["outside_run_task_seconds"] - local["outside_run_task_seconds"]
    s_per_mib = ray_cost_s / (ray1["bytes_per_iteration"] / 2**20)
    update_s = local["seconds_per_iteration"] - local["run_tasks_seconds"]

    def driver_s(workers: int) -> float:
        return s_per_mib * (theta_mib + workers * per_task_mib)

    return [
        "## Scaling projection: 8 to 64 GPU workers",
        "",
        f"Measured here (CPU, n = {n}): θ = {theta_mib:.1f} MiB, put once per iteration; each task sends back "
        f"{per_task_mib:.1f} MiB (meta gradients of the target table, the encoder and its source's table, plus "
        f"that table's inner-loop delta); Ray's cost was {ray_cost_s:.3f} s for {ray1['bytes_per_iteration'] / 2**20:.0f} MiB "
        f"moved, i.e. {1000 * s_per_mib:.1f} ms per MiB through the driver (put, (de)serialisation, get); the "
        f"outer update (combine, clip, AdamW) took {update_s:.3f} s. The reference problem (4 sources, "
        "amazon-beauty's 57k items among them) has a θ about twice this size; the numbers below scale with it.",
        "",
        "With one task per GPU worker (n = W) per iteration:",
        f"- broadcast: θ enters the object store once and is pulled once per *node* (workers of a node share "
        f"it): {theta_mib:.0f} MiB × nodes, {8 * theta_mib:.0f} MiB for 8 nodes × 8 GPUs;",
        f"- gather: all n results flow into the driver: {8 * per_task_mib:.0f} MiB at n = 8, "
        f"{64 * per_task_mib:.0f} MiB at n = 64 ({64 * per_task_mib * 8 / 1024 / 10:.2f} s on a 10 Gb/s NIC, "
        f"{64 * per_task_mib * 8 / 1024 / 100:.2f} s on 100 Gb/s);",
        f"- driver work at the measured {1000 * s_per_mib:.1f} ms/MiB: ≈ {driver_s(8):.2f} s per iteration at n = 8 and "
        f"≈ {driver_s(64):.2f} s at n = 64, plus the weighted sum over n gradients (memory-bound, O(n · |θ|)); "
        "the per-tensor softmax over n scalars and the single clip + optimizer step do not grow with n.",
        "",
        "The GPU time of one task at reference size was not measured (no GPU here), so where the crossover lies "
        "is open; what is certain is that the driver's share grows linearly with n while each task's time stays "
        "flat, and that at n = 64 the single-driver gather is on the order of seconds per iteration. The remedy "
        "keeps the math: the softmax weights need only the scalar similarities, so a two-phase step (gather the "
        "n × tensors scalars, compute the weights, then a tree- or all-reduce of the weighted gradients among "
        "the workers) hands the driver one gradient instead of n.",
    ]


def main() -> None:
    args = parse_args()
    load = os.getloadavg()
    torch.set_num_threads(args.threads)
    root = prepare_shared_data()
    meta = header(
        "Ray runner overhead per meta iteration",
        f"target {args.target} ({args.target_users} users), sources {args.sources}, LRU hidden 64 × 2 blocks, "
        f"batch {args.batch_size}, n = {args.tasks} tasks, source negatives {args.source_negatives}, "
        f"{args.warmup} warm-up + {args.iterations} timed iterations per runner",
    )
    rows = [measure(args, root, runner) for runner in ("local", "ray_1", "ray_2")]
    local = rows[0]
    for r in rows:
        r["overhead_vs_local"] = r["seconds_per_iteration"] / local["seconds_per_iteration"] - 1
        r["ray_cost_vs_local"] = (r["outside_run_task_seconds"] - local["outside_run_task_seconds"]) / local["seconds_per_iteration"]
    ray1, ray2 = rows[1], rows[2]
    verdict = "met" if max(ray1["ray_cost_vs_local"], ray1["overhead_vs_local"]) <= 0.15 else (
        "met for Ray's own cost" if ray1["ray_cost_vs_local"] <= 0.15 else "NOT met")
    notes = [
        f"**Result**: Ray's own cost per iteration is {ray1['outside_run_task_seconds'] - local['outside_run_task_seconds']:.3f} s "
        f"with 1 worker ({ray1['ray_cost_vs_local']:+.1%} of the local iteration) and "
        f"{ray2['outside_run_task_seconds'] - local['outside_run_task_seconds']:.3f} s with 2 ({ray2['ray_cost_vs_local']:+.1%}); "
        f"end to end ray_1 is {ray1['overhead_vs_local']:+.1%} vs local, which also holds the compute-time noise "
        f"(mean task {ray1['task_seconds'] / args.tasks:.2f} s in the worker vs {local['task_seconds'] / args.tasks:.2f} s "
        f"locally). Target ≤ 15 %: {verdict}. Load average when started: {load[0]:.1f} "
        f"on {os.cpu_count()} cores (shared machine); ray_2's tasks took {ray2['task_seconds'] / args.tasks:.2f} s each "
        "with both workers computing at once.",
        "",
        f"Every worker (and the local runner) computes with {args.threads} torch thread(s), so ray_1 does the local "
        "runner's work exactly and any extra time is Ray's (target ≤ 15 %). ray_2 runs two such "
        f"workers on {os.cpu_count()} cores shared with other jobs; with n = {args.tasks} tasks its busiest worker "
        "runs 2 of them, so its best case is 2/3 of the local time, and it cannot beat a local runner that had "
        "both cores to itself.",
        "`outside_run_task_share` = 1 − busiest worker's `run_task` time / iteration time: sampling, "
        "transfer, (de)serialisation, waiting, and the outer update on the driver. `ray_cost_vs_local` = the "
        "extra time outside `run_task` compared with the local runner, as a share of the local iteration: "
        "Ray's own cost, free of the compute-time noise of a shared machine (see `seconds_spread`: ray_1's "
        "`overhead_vs_local` holds that noise; ray_2's also its parallelism).",
        "",
        *projection(rows, args.tasks),
    ]
    write_results("ray_overhead", meta, rows, notes)
    for r in rows:
        print(f"{r['runner']}: {r['seconds_per_iteration']:.2f} s/iteration, overhead {r['overhead_vs_local']:+.1%}, "
              f"{r['bytes_per_iteration'] / 2**20:.1f} MiB moved, outside run_task {r['outside_run_task_share']:.1%}")


if __name__ == "__main__":
    main()
