"""Reproduce the LRURec paper's single-domain anchors (target-only LRURec and SASRec).

Settings from ../shared/data/README.md: hidden 64, 2 blocks, max length 50 (200 for
MovieLens), dropout 0.2, AdamW lr 1e-3, weight decay 0.01, batch 128, cross-entropy
over all items at every position, history items excluded at evaluation.

    python benchmarks/reproduce_lrurec.py                 # CPU budget (this machine)
    python benchmarks/reproduce_lrurec.py --full          # paper-scale budget (GPU)

Also reports training throughput (sequences/s), evaluation throughput (users/s) and
the peak memory of evaluating amazon-beauty (57k items) in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from common import METRICS, bench_config, experiment_dir, header, peak_rss_gib, prepare_shared_data, write_results

from metarec.config import config_from_dict
from metarec.train import train

PUBLISHED = {
    ("movielens-1m", "lru"): 0.19298,
    ("movielens-1m", "sasrec"): 0.19021,
    ("amazon-video-games", "lru"): 0.06198,
    ("amazon-video-games", "sasrec"): 0.05829,
}


def config(root: str, dataset: str, backbone: str, seed: int, steps: int, eval_every: int) -> dict:
    """configs/target_only_video.yaml (the LRURec settings) on `dataset` with `backbone`."""
    return bench_config("target_only_video", {
        "name": f"reproduce_{dataset}_{backbone}", "seed": seed, "data.root": root, "data.target": dataset,
        "data.max_len": 200 if dataset == "movielens-1m" else 50, "model.backbone": backbone,
        "train.max_steps": steps, "train.eval_every": eval_every, "train.patience": 5, "train.progress": sys.stderr.isatty(),
    })


def beauty_eval_memory(root: str) -> dict:
    """Peak RSS of a fresh process that evaluates an LRURec model on amazon-beauty's test split.

    Read from /proc/self/status VmHWM: getrusage's ru_maxrss survives fork + exec on
    Linux, so in a child it would report this (much larger) benchmark process's peak.
    """
    code = f"""
import json, time, resource
from metarec.config import config_from_dict
from metarec.problem import build_problem, target_metrics
cfg = config_from_dict({{"data": {{"root": {root!r}, "target": "amazon-beauty"}}, "train": {{"eval_batch_size": 256}}}})
p = build_problem(cfg)
t = time.perf_counter(); m = target_metrics(p, "test"); dt = time.perf_counter() - t
hwm_kib = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
print(json.dumps({{"peak_rss_gib": hwm_kib / 2**20, "users_per_s": m["n_users"] / dt}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_notes(mem: dict) -> list[str]:
    return [
        f"Peak memory of evaluating amazon-beauty (57,289 items, fresh process, eval batch 256): {mem['peak_rss_gib']:.2f} GiB (target < 2 GiB); {mem['users_per_s']:.0f} users/s.",
        "Target: test NDCG@10 within 5% of the published value (ratio >= 0.95).",
    ]


def remeasure_memory(root: str) -> None:
    folder = experiment_dir("reproduce_lrurec")
    rows = json.loads((folder / "reproduce_lrurec.json").read_text())
    meta = json.loads((folder / "reproduce_lrurec.meta.json").read_text())
    mem = beauty_eval_memory(root)
    meta["beauty_eval"] = mem
    for r in rows:
        r["beauty eval peak GiB"] = round(mem["peak_rss_gib"], 3)
    write_results("reproduce_lrurec", meta, rows, memory_notes(mem), experiment="reproduce_lrurec")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="paper-scale budget (for a GPU)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--datasets", nargs="+", default=["movielens-1m", "amazon-video-games"])
    ap.add_argument("--backbones", nargs="+", default=["lru", "sasrec"])
    ap.add_argument("--steps", type=int, default=None, help="override the step budget per run")
    ap.add_argument("--memory-only", action="store_true", help="re-measure the beauty evaluation memory into existing results")
    args = ap.parse_args()
    root = prepare_shared_data()
    if args.memory_only:
        return remeasure_memory(root)
    budgets = {"movielens-1m": (20000, 1000), "amazon-video-games": (40000, 1000)} if args.full else {"movielens-1m": (500, 125), "amazon-video-games": (1000, 250)}
    rows = []
    for dataset in args.datasets:
        steps, every = budgets[dataset]
        steps = args.steps or steps
        for backbone in args.backbones:
            for seed in args.seeds:
                cfg = config_from_dict(config(root, dataset, backbone, seed, steps, min(every, steps)))
                with tempfile.TemporaryDirectory() as run_dir:
                    m = train(cfg, run_dir)
                published = PUBLISHED.get((dataset, backbone))
                row = {"dataset": dataset, "method": f"{backbone}_target_only", "seed": seed}
                row.update({k: m["test"][k] for k in METRICS})
                row.update({
                    "published NDCG@10": published,
                    "ratio to published": m["test"]["NDCG@10"] / published if published else None,
                    "steps": m["steps"], "best_step": m["best_step"],
                    "train seq/s": m["steps"] * 128 / max(m["train_seconds"], 1e-9),
                    "eval users/s": m["eval_users_per_s"],
                })
                rows.append(row)
                print(json.dumps(row), flush=True)
    mem = beauty_eval_memory(root)
    meta = header("Target-only LRURec / SASRec vs the LRURec paper", "full" if args.full else "CPU budget: " + ", ".join(f"{d}: {budgets[d][0]} steps" for d in args.datasets))
    meta["beauty_eval"] = mem
    meta["driver_peak_rss_gib"] = peak_rss_gib()
    notes = memory_notes(mem)
    for r in rows:
        r["beauty eval peak GiB"] = round(mem["peak_rss_gib"], 3)
    write_results("reproduce_lrurec", meta, rows, notes, experiment="reproduce_lrurec")


if __name__ == "__main__":
    main()
