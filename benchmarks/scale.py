"""The runners compared per meta iteration: local vs driver (Ray actors) vs collective
(Ray Train all-reduce), measured with 1-3 workers and projected to 8-64 GPU workers.

Same config and seeds for every runner, so each performs the very same tasks and update
(the collective one up to float summation order). Per runner and worker count: warm-up
iterations (not timed), then timed meta iterations. Reported per iteration:

- seconds_per_iteration: local and driver: `Trainer.step` on the driver (sampling,
  `run_tasks`, outer update); collective: the workers' step (their tasks, the all-gather,
  the all-reduce, the outer step) plus the `ray.train.report` of the step's metrics;
- task_seconds, critical_path_seconds (local and driver): time inside `run_task` summed
  over the tasks, and the busiest worker's share of it; outside_run_task_seconds: the
  rest of the iteration (sampling, transfer, (de)serialisation, waiting, outer update);
- overhead_vs_local (`seconds / local seconds - 1`) and ray_cost_vs_local (the extra
  time outside `run_task` against the local runner, as a share of the local iteration:
  Ray's own cost, free of the compute-time noise of a shared machine);
- bytes_to_driver_per_iteration: driver: the task results the driver gets (meta gradients,
  source deltas); collective: the JSON metrics row each step reports; local: 0;
- bytes_per_worker_per_iteration: driver: θ pulled once plus the results the busiest worker
  sends; collective: what one worker sends in a ring all-reduce of the summed buffer,
  2 (W - 1) / W x payload, plus the same for the scalar table (0 with one worker);
- to_driver_vs_driver_runner: bytes to the driver relative to the driver runner with as
  many workers.

All workers compute with 1 torch thread (the local row runs in a Ray task with a
worker's CPU share). On a 2-core machine 2 and 3 workers contend for the cores, so
seconds do not show a speedup; they show what each design costs besides the tasks.

    python benchmarks/scale.py                     # results/scale/scale.*
    python benchmarks/scale.py --ray-overhead      # results/scale/ray_overhead.*: local vs driver
                                                   # with 1 and 2 one-CPU workers, 3,000 target users
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import torch
from common import bench_config, experiment_dir, header, prepare_shared_data, timed_iterations, write_results

from metarec.config import config_from_dict
from metarec.problem import build_problem
from metarec.ray.driver import RayRunner, result_bytes, tensor_bytes
from metarec.ray.session import connect
from metarec.ray.ray_train import fit_with_ray_train
from metarec.run_dir import RunDir
from metarec.train import Trainer

RING = "2 (W - 1) / W"
RAY_OVERHEAD = {"name": "ray_overhead", "target_users": 3000, "batch_size": 64, "iterations": 5, "workers": [1, 2],
                "cpus_per_worker": 1.0, "collective": False}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="scale", help="results file stem in benchmarks/results/scale/")
    p.add_argument("--target", default="amazon-video-games")
    p.add_argument("--sources", nargs="+", default=["amazon-sports", "yelp"])
    p.add_argument("--target-users", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--source-negatives", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--no-collective", dest="collective", action="store_false", help="local and driver runner only")
    p.add_argument("--ray-overhead", action="store_true",
                   help="what Ray costs: " + ", ".join(f"{k}={v}" for k, v in RAY_OVERHEAD.items()))
    p.add_argument("--project-only", action="store_true", help="rewrite the results from scale.json's measured rows")
    args = p.parse_args()
    if args.ray_overhead:
        vars(args).update(RAY_OVERHEAD)
    return args


def run_config(args, root: str, mode: str, workers: int) -> dict:
    steps = args.warmup + args.iterations
    return bench_config("metarec_video", {
        "name": f"{args.name}-{mode}-{workers}", "data.root": root, "data.target": args.target,
        "data.sources": args.sources, "data.target_users": args.target_users,
        "train.batch_size": args.batch_size, "train.source_negatives": args.source_negatives, "train.device": "cpu",
        "train.progress": False, "train.max_steps": steps, "train.eval_every": steps, "train.checkpoint_every": 0,
        "meta.tasks_per_iter": args.tasks,
        "ray.mode": mode, "ray.num_workers": workers, "ray.cpus_per_worker": args.cpus_per_worker,
    })


def measure_driver(args, root: str, workers: int | None) -> dict:
    """`workers=None`: the local runner; else the driver runner with that many actors."""
    cfg = config_from_dict(run_config(args, root, "driver", workers or 1), "benchmark config")
    factory = None if workers is None else (lambda problem: RayRunner(problem.cfg))  # noqa: E731
    trainer = Trainer.from_config(cfg, "unused", factory)
    theta = tensor_bytes(p.detach() for p in trainer.model.parameters())
    steps = timed_iterations(trainer, args.warmup, args.iterations)
    to_driver, per_worker = [], []
    for s in steps:
        sent = [0 if workers is None else sum(result_bytes(r) for r in rs) for rs in s["by_slot"].values()]
        to_driver.append(sum(sent))
        per_worker.append(0 if workers is None else theta + max(sent))
    r = row("local" if workers is None else "driver", workers or 1, [s["seconds"] for s in steps], to_driver, per_worker,
            theta, str(trainer.problem.device))
    mean = {k: statistics.fmean(s[k] for s in steps) for k in ("seconds", "tasks", "critical")}
    r.update({
        "task_seconds": mean["tasks"],
        "critical_path_seconds": mean["critical"],
        "outside_run_task_seconds": mean["seconds"] - mean["critical"],
    })
    return r


def measure_local_in_ray(args, root: str) -> dict:
    """The local runner inside a Ray task with a worker's CPU share: the same process
    priority and CPU share as a Ray worker, so that its seconds compare with the Ray rows."""
    import ray

    def local(args, root):
        torch.set_num_threads(1)
        return measure_driver(args, root, None)

    return ray.get(ray.remote(num_cpus=args.cpus_per_worker)(local).remote(args, root))


def measure_collective(args, root: str, workers: int) -> dict:
    cfg = config_from_dict(run_config(args, root, "collective", workers), "benchmark config")
    with tempfile.TemporaryDirectory(prefix="metarec-scale-") as out:
        fit_with_ray_train(cfg, out, local=True)
        rows = RunDir(out).read_history()[args.warmup:]
    theta = tensor_bytes(p.detach() for p in build_problem(cfg).model.parameters())
    r = row("collective", workers, [x["step_seconds"] + x["report_seconds"] for x in rows],
            [x["bytes_to_driver"] for x in rows], [x["bytes_per_worker"] for x in rows], theta, "cpu")
    r["collective_payload_bytes"] = int(statistics.fmean(x["collective_payload_bytes"] for x in rows))
    return r


def row(runner: str, workers: int, seconds, to_driver, per_worker, theta: int, device: str) -> dict:
    return {
        "runner": runner,
        "workers": workers,
        "seconds_per_iteration": statistics.fmean(seconds),
        "seconds_spread": max(seconds) - min(seconds),
        "bytes_to_driver_per_iteration": int(statistics.fmean(to_driver)),
        "bytes_per_worker_per_iteration": int(statistics.fmean(per_worker)),
        "theta_bytes": theta,
        "device": device,
    }


def projection(rows: list[dict], args) -> tuple[list[dict], list[str]]:
    """Rows for 8-64 GPU workers (one task each) from the measured sizes and per-MiB cost."""
    mib = 2**20
    local = next(r for r in rows if r["runner"] == "local")
    driver1 = next(r for r in rows if r["runner"] == "driver" and r["workers"] == 1)
    coll = max((r for r in rows if r["runner"] == "collective"), key=lambda r: r["workers"])
    theta_mib = local["theta_bytes"] / mib
    per_task_mib = driver1["bytes_to_driver_per_iteration"] / mib / args.tasks
    moved_mib = (driver1["bytes_to_driver_per_iteration"] + driver1["theta_bytes"]) / mib
    measured = (driver1["outside_run_task_seconds"] - local["outside_run_task_seconds"]) / moved_mib
    reference = 0.0014  # s/MiB through the driver, results/scale/ray_overhead.md
    s_per_mib = measured if measured > 0 else reference
    buffer_mib = coll["collective_payload_bytes"] / mib  # what each step all-reduces (buffer + scalar table)
    report_kib = coll["bytes_to_driver_per_iteration"] / 1024
    out = []
    for w in (8, 16, 32, 64):
        ring_mib = 2 * (w - 1) / w * buffer_mib
        out.append({
            "gpu_workers": w,
            "driver_mib_to_driver": round(w * per_task_mib, 1),
            "driver_seconds_at_driver": round(s_per_mib * (theta_mib + w * per_task_mib), 3),
            "driver_nic_seconds_10gbps": round(w * per_task_mib * 8 / 1024 / 10, 3),
            "collective_kib_to_driver": round(report_kib, 2),
            "collective_mib_per_worker": round(ring_mib, 1),
            "allreduce_seconds_10gbps": round(ring_mib * 8 / 1024 / 10, 3),
            "allreduce_seconds_100gbps": round(ring_mib * 8 / 1024 / 100, 4),
        })
    notes = [
        "## Projection: 8 to 64 GPU workers, one task per worker (n = W)",
        "",
        f"From the measured sizes: θ = {theta_mib:.1f} MiB; each task sends the driver runner {per_task_mib:.1f} MiB; "
        f"the collective runner all-reduces one buffer of {buffer_mib:.1f} MiB (the summed weighted meta gradients "
        f"and inner-loop changes; it does not grow with n once every source is sampled) and reports "
        f"{report_kib:.2f} KiB of metrics per step. Driver cost per MiB: "
        + (f"{1000 * measured:.2f} ms measured here (time outside `run_task`, driver runner with 1 worker minus "
           "the local runner, per MiB moved: θ out, results back)"
           if measured > 0 else f"the measured difference was not positive on this loaded machine, so "
           f"{1000 * reference:.1f} ms from scale/ray_overhead.md is used")
        + f". The all-reduce moves {RING} x buffer per worker (ring all-reduce), in parallel on every link.",
        "",
        "| GPU workers | driver runner: MiB into the driver | driver runner: driver seconds | driver runner: driver NIC s at 10 Gb/s | "
        "collective: KiB to the driver | collective: MiB sent per worker | all-reduce s at 10 Gb/s | all-reduce s at 100 Gb/s |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {p['gpu_workers']} | {p['driver_mib_to_driver']} | {p['driver_seconds_at_driver']} | {p['driver_nic_seconds_10gbps']} | "
          f"{p['collective_kib_to_driver']} | {p['collective_mib_per_worker']} | {p['allreduce_seconds_10gbps']} | "
          f"{p['allreduce_seconds_100gbps']} |" for p in out),
        "",
        "The driver runner's driver work grows linearly with n (all n results pass through one process and one "
        "NIC); the collective runner's per-worker traffic is bounded by 2 × buffer whatever W, the driver sees only "
        "metrics. Per worker the two are comparable (a driver-runner worker pulls θ and sends one task's result, "
        f"{theta_mib + per_task_mib:.0f} MiB; a collective worker sends up to {2 * buffer_mib:.0f} MiB), but the "
        "collective runner moves it on all links at once, while the driver runner funnels n results into one place. "
        "With W ≤ 3 on one machine (measured above) the all-reduce costs about as much as the gather (within the "
        "noise of a loaded machine). The gain lies past the single driver's limit: at the per-MiB cost used here the "
        f"driver's share is {s_per_mib * (theta_mib + 8 * per_task_mib):.1f} s per iteration at n = 8 and "
        f"{s_per_mib * (theta_mib + 64 * per_task_mib):.1f} s at n = 64 (at ray_overhead.md's {1000 * reference:.1f} ms/MiB, "
        f"measured on a less loaded machine: {reference * (theta_mib + 8 * per_task_mib):.2f} s and "
        f"{reference * (theta_mib + 64 * per_task_mib):.2f} s), growing with n while the collective runner's stays flat. "
        "The scalar all-gather (n × (4 · #tensors + 4) floats) stays in the kilobytes, and each task's compute "
        "stays flat in both runners. On GPUs the collective runner would use NCCL (Ray Train's default there); the "
        "seconds above are bandwidth only (no latency terms, no overlap with compute).",
    ]
    return out, notes


def add_ray_cost(rows: list[dict]) -> None:
    """overhead_vs_local and ray_cost_vs_local of every local and driver row."""
    local = next(r for r in rows if r["runner"] == "local")
    for r in rows:
        if r["runner"] in ("local", "driver"):
            r["overhead_vs_local"] = r["seconds_per_iteration"] / local["seconds_per_iteration"] - 1
            r["ray_cost_vs_local"] = (r["outside_run_task_seconds"] - local["outside_run_task_seconds"]) / local["seconds_per_iteration"]


def ray_cost_notes(rows: list[dict], args, load: float) -> list[str]:
    local = next(r for r in rows if r["runner"] == "local")
    parts = [f"{r['outside_run_task_seconds'] - local['outside_run_task_seconds']:.3f} s with {r['workers']} worker(s) "
             f"({r['ray_cost_vs_local']:+.1%} of the local iteration)" for r in rows if r["runner"] == "driver"]
    worst = max(r["ray_cost_vs_local"] for r in rows if r["runner"] == "driver")
    return [
        f"**Ray's own cost** per iteration (driver runner, time outside `run_task` beyond the local runner's): "
        f"{'; '.join(parts)}. Target ≤ 15 %: {'met' if worst <= 0.15 else 'NOT met'}. Load average when started: "
        f"{load:.1f} on {os.cpu_count()} cores (shared machine), so seconds are indicative only; every Ray worker asks "
        f"for {args.cpus_per_worker:g} CPU and computes with 1 thread; the local row runs in a Ray task of the same "
        "share (same process priority as the workers).",
        "",
        "Columns: see the docstring of benchmarks/scale.py.",
    ]


def write(rows: list[dict], meta: dict, args, load: float) -> None:
    """Results files: the measured rows, Ray's own cost, and with the collective runner the
    projection and the verdict on bytes to the driver."""
    add_ray_cost(rows)
    notes = ray_cost_notes(rows, args, load)
    if not any(r["runner"] == "collective" for r in rows):
        write_results(args.name, meta, rows, notes, experiment="scale")
        return
    for r in rows:
        driver = next(d for d in rows if d["runner"] == "driver" and d["workers"] == r["workers"])
        r["to_driver_vs_driver_runner"] = (r["bytes_to_driver_per_iteration"] / driver["bytes_to_driver_per_iteration"]
                                           if r["runner"] != "local" else 0.0)
    worst = max(r["to_driver_vs_driver_runner"] for r in rows if r["runner"] == "collective")
    projected, projection_notes = projection(rows, args)
    notes = [
        f"**Result**: the collective runner sends the driver at most {worst:.4%} of the driver runner's bytes per "
        f"iteration (target ≤ 1 %: {'met' if worst <= 0.01 else 'NOT met'}).",
        "",
        *notes,
        "",
        *projection_notes,
    ]
    write_results(args.name, meta | {"projection": projected}, rows, notes, experiment="scale")
    (experiment_dir("scale") / f"{args.name}.json").write_text(json.dumps({"measured": rows, "projected": projected}, indent=1) + "\n")


def main() -> None:
    args = parse_args()
    folder = experiment_dir("scale")
    if args.project_only:  # rewrite the files from the measured rows (e.g. after changing the projection)
        meta = json.loads((folder / f"{args.name}.meta.json").read_text())
        meta.pop("projection", None)
        rows = json.loads((folder / f"{args.name}.json").read_text())["measured"]
        write(rows, meta, args, float(meta.get("load_average", "nan")))
        return
    load = os.getloadavg()[0]
    torch.set_num_threads(1)
    root = prepare_shared_data()
    meta = header(
        "Ray's own cost per meta iteration: local vs driver runner" if args.ray_overhead else
        "Scaling: local vs driver vs collective runner per meta iteration",
        f"target {args.target} ({args.target_users} users), sources {args.sources}, LRU hidden 64 × 2 blocks, "
        f"batch {args.batch_size}, n = {args.tasks} tasks, source negatives {args.source_negatives}, "
        f"{args.warmup} warm-up + {args.iterations} timed iterations per runner, workers {args.workers}",
    )
    connect(None)
    rows = [measure_local_in_ray(args, root)]
    for w in args.workers:
        rows.append(measure_driver(args, root, w))
        print(json.dumps(rows[-1]), flush=True)
    for w in args.workers if args.collective else []:
        rows.append(measure_collective(args, root, w))
        print(json.dumps(rows[-1]), flush=True)
    meta["load_average"] = load
    write(rows, meta, args, load)


if __name__ == "__main__":
    main()
