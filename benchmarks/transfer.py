"""The transfer benchmark: MetaRec vs target-only, joint training and the ablations.

Reference split (../shared/data/README.md): target amazon-video-games; sources
amazon-beauty, amazon-sports, yelp, movielens-1m. Every method gets the same data,
backbone size, step budget, evaluation schedule and seeds, in one run.

    python benchmarks/transfer.py                  # CPU reduced protocol (documented in the output)
    python benchmarks/transfer.py --full           # full target, paper-scale budget (GPU)
    python benchmarks/transfer.py --target yelp --sources amazon-beauty amazon-sports ...

Also measures the cost of one meta iteration (n = 3, second order) against one
joint-training step on the same batches, the share of that time spent in VQ, and the
peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch
from common import METRICS, bench_config, experiment_dir, header, peak_rss_gib, prepare_shared_data, summarize, write_results

import metarec.objective as objective
from metarec.config import config_from_dict
from metarec.train import Trainer, train

# Method = dotted-key overrides of the MetaRec config (configs/metarec_video.yaml)
METHODS: dict[str, dict] = {
    "lru_target_only": {"data.sources": []},
    "sasrec_target_only": {"data.sources": [], "model.backbone": "sasrec"},
    # MetaRec's outer step sees n target batches per iteration; this baseline sees as much target data per step
    "lru_target_only_nx_batch": {"data.sources": [], "train.batch_size": 128 * 3},
    "joint": {"meta.enabled": False},
    "metarec": {},
    "metarec_single_head": {"vq.heads": 1},
    "metarec_no_vq": {"vq.enabled": False},
    "metarec_no_rescale": {"rescale.enabled": False},
    "metarec_paper_literal": {"rescale.direction": "paper_literal"},
}


def run_config(args, root: str, seed: int, method: str) -> dict:
    return bench_config("metarec_video", {
        "name": "transfer", "seed": seed, "data.root": root, "data.target": args.target, "data.sources": args.sources,
        "data.source_max_len": args.source_max_len, "data.target_users": args.target_users,
        "train.max_steps": args.steps, "train.eval_every": args.eval_every, "train.patience": 100,
        "train.source_negatives": args.source_negatives, "train.checkpoint_every": 0, "train.progress": sys.stderr.isatty(),
        "meta.inner_lr": args.inner_lr, "meta.source_batch_size": args.source_batch_size, "rescale.tau": args.tau,
        **METHODS[method],
    })


def iteration_cost(args, root: str, iterations: int = 4) -> dict:
    """Seconds of one MetaRec iteration vs one joint step on the same task batches; VQ share; peak RSS."""
    vq_time = [0.0]
    original = objective.quantize

    def timed_quantize(*a, **k):
        t = time.perf_counter()
        out = original(*a, **k)
        vq_time[0] += time.perf_counter() - t
        return out

    objective.quantize = timed_quantize
    try:
        out = {}
        with tempfile.TemporaryDirectory() as tmp:
            for method in ("metarec", "joint"):
                raw = run_config(args, root, 0, method)
                raw["train"]["progress"] = False
                trainer = Trainer.from_config(config_from_dict(raw), f"{tmp}/{method}")
                trainer.step(0)  # warm-up
                vq_time[0] = 0.0
                t = time.perf_counter()
                for i in range(1, iterations + 1):
                    trainer.step(i)
                out[method] = (time.perf_counter() - t) / iterations
                out[f"{method}_vq_share"] = vq_time[0] / (out[method] * iterations)
        return {
            "seconds_per_metarec_iteration": out["metarec"],
            "seconds_per_joint_step": out["joint"],
            "ratio": out["metarec"] / out["joint"],
            "vq_share_of_metarec_iteration": out["metarec_vq_share"],
            "peak_rss_gib": peak_rss_gib(),
        }
    finally:
        objective.quantize = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="full target and a paper-scale budget (GPU)")
    ap.add_argument("--target", default="amazon-video-games")
    ap.add_argument("--sources", nargs="+", default=["amazon-beauty", "amazon-sports", "yelp", "movielens-1m"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--target-users", type=int, default=8000, help="seeded target subsample (0 = all)")
    ap.add_argument("--source-negatives", type=int, default=1024)
    ap.add_argument("--source-max-len", type=int, default=20)
    ap.add_argument("--source-batch-size", type=int, default=64)
    ap.add_argument("--inner-lr", type=float, default=1e-2)
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--results-name", default="transfer", help="benchmarks/results/transfer/NAME.{json,md}")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (run seeds in parallel with 1 each)")
    ap.add_argument(
        "--rows-from", nargs="+", default=None, metavar="NAME",
        help="skip training: combine the rows of earlier runs (benchmarks/results/transfer/NAME.json, e.g. one per seed)",
    )
    args = ap.parse_args()
    if args.full:
        args.target_users, args.steps, args.eval_every = 0, 20000, 500
    args.target_users = args.target_users or None
    root = prepare_shared_data()

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    t0 = time.perf_counter()
    if args.rows_from:
        for name in args.rows_from:
            rows.extend(json.loads((experiment_dir("transfer") / f"{name}.json").read_text()))
        args.seeds = sorted({r["seed"] for r in rows})
    for seed in [] if args.rows_from else args.seeds:
        for method in args.methods:
            cfg = config_from_dict(run_config(args, root, seed, method))
            with tempfile.TemporaryDirectory() as run_dir:
                m = train(cfg, run_dir)
            row = {"dataset": args.target, "method": method, "seed": seed, **{k: m["test"][k] for k in METRICS}}
            row.update({"val NDCG@10": m["val"]["NDCG@10"], "best_step": m["best_step"], "train_seconds": m["train_seconds"]})
            if m["source_weights"]:
                last = m["source_weights"][-1]
                row["final source weights"] = {k: round(v, 4) for k, v in last.items() if k != "step"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    wall = time.perf_counter() - t0

    summary = summarize(rows)
    best_target_only = max((r for r in summary if "target_only" in r["method"]), key=lambda r: r["NDCG@10"], default=None)
    meta_row = next((r for r in summary if r["method"] == "metarec"), None)
    notes = []
    if best_target_only and meta_row:
        ratio = meta_row["NDCG@10"] / best_target_only["NDCG@10"]
        ablations = [r for r in summary if r["method"].startswith("metarec_")]
        beaten = [r["method"] for r in ablations if r["NDCG@10"] >= meta_row["NDCG@10"]]
        notes.append(
            f"MetaRec / best target-only ({best_target_only['method']}) test NDCG@10 = {ratio:.3f} (target >= 1.06). "
            + ("MetaRec is above every ablation." if not beaten else f"Ablations at or above MetaRec: {', '.join(beaten)}.")
        )
    cost = None if args.skip_cost else iteration_cost(args, root)
    if cost:
        notes.append(
            f"One MetaRec iteration (n=3, second order): {cost['seconds_per_metarec_iteration']:.3f} s; one joint step on the "
            f"same batches: {cost['seconds_per_joint_step']:.3f} s; ratio {cost['ratio']:.2f}x (target <= 4x). "
            f"VQ share of the MetaRec iteration: {100 * cost['vq_share_of_metarec_iteration']:.1f}%. Peak RSS {cost['peak_rss_gib']:.2f} GiB."
        )
    protocol = (
        "full target, paper-scale budget" if args.full else
        f"CPU reduced protocol: target {args.target} subsampled to {args.target_users} users (seeded), "
        f"{args.steps} steps per method, validation every {args.eval_every}, best-validation checkpoint, "
        f"sources {', '.join(args.sources)} (window {args.source_max_len}, batch {args.source_batch_size}, {args.source_negatives} sampled negatives), "
        f"LRU 64x2, target batch 128, n=3 tasks, alpha={args.inner_lr}, tau={args.tau}, seeds {args.seeds}"
    )
    meta = header("Transfer: MetaRec vs target-only, joint and ablations", protocol)
    meta.update({"wall_seconds": wall, "iteration_cost": cost, "summary": summary})
    notes.insert(0, "Mean over seeds (spread = max - min):")
    notes.insert(1, "")
    cols = ["method", "seeds", *METRICS, *(f"{m} spread" for m in METRICS)]
    notes.insert(2, "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" + "\n".join(
        "| " + " | ".join(f"{r[c]:.5f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |" for r in summary))
    for r in rows:
        r["device"] = meta["machine"]
    write_results(args.results_name, meta, rows, notes, experiment="transfer")


if __name__ == "__main__":
    main()
