"""Ray Tune sweep of MetaRec on the reference transfer split, against the default config.

Target amazon-video-games; sources amazon-beauty, amazon-sports, yelp, movielens-1m
(../shared/data/README.md). The space is tune/spaces/default.yaml (τ, VQ heads, α, β,
inner steps; ASHA on validation NDCG@10); the default config is
configs/metarec_video.yaml. Both get the same step budget, and the default config is
trained once more outside the sweep so the two can be compared on test NDCG@10 (the
tuned trial is picked by validation NDCG@10, never by test).

Reduced CPU protocol (the default; a 2-core machine, hours): 8 trials of 500 meta
iterations, validation every 100 (ASHA grace 2 evaluations, reduction factor 2).

    python benchmarks/tune_video.py                              # reduced CPU protocol
    python benchmarks/tune_video.py --trials 16 --steps 3000 --eval-every 250   # the space file's budget (GPU)
    python benchmarks/tune_video.py --steps 4 --trials 2         # smoke test (minutes)
    python benchmarks/tune_video.py --resume                     # continue an interrupted sweep

Writes benchmarks/results/tune_video/tune_video.{json,md,meta.json}: one row per trial (τ, heads,
α, β, inner steps, best validation NDCG@10, test metrics) and a row for the default
config; the sweep's own results.md, best_config.yaml and sweep.png stay in the
experiment directory (runs/tune/<name> unless --storage-path).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from common import METRICS, REPO, header, prepare_shared_data, write_results

from metarec import fs
from metarec.run_dir import RunDir
from metarec.train import train
from tune.space import load_space
from tune.sweep import run_sweep

SPACE = REPO / "tune" / "spaces" / "default.yaml"
BASE = REPO / "configs" / "metarec_video.yaml"
COLUMNS = {"rescale.tau": "tau", "vq.heads": "heads", "meta.inner_lr": "alpha", "train.lr": "beta", "meta.inner_steps": "inner_steps"}


def write_space(path: Path, root: str, args: argparse.Namespace) -> str:
    """tune/spaces/default.yaml with this run's budget, data root and trial count."""
    space = yaml.safe_load(SPACE.read_text())
    space["base_config"] = str(BASE)
    space["num_samples"] = args.trials
    space["max_concurrent_trials"] = args.concurrent
    overrides = {"data.root": root, "train.max_steps": args.steps, "train.eval_every": min(args.eval_every, args.steps), "train.progress": False}
    if args.target_users:
        overrides["data.target_users"] = args.target_users
    space["overrides"] = overrides
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return str(path)


def default_run(space_path: str, run_dir: str) -> dict:
    """Train the default config (base + the same overrides) once; reuse a finished run."""
    run = RunDir(run_dir)
    if run.finished():
        return run.read_metrics()
    cfg = load_space(space_path).config({"name": "tune_video-default"})
    return train(cfg, run_dir, resume=run.has_config())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8, help="Tune trials (num_samples)")
    ap.add_argument("--steps", type=int, default=500, help="meta iterations per trial (and for the default config)")
    ap.add_argument("--eval-every", type=int, default=100, help="validation interval (ASHA counts evaluations)")
    ap.add_argument("--target-users", type=int, default=None, help="seeded subsample of target users (data.target_users)")
    ap.add_argument("--concurrent", type=int, default=None, help="max concurrent trials (default: as CPUs allow)")
    ap.add_argument("--storage-path", default=str(REPO / "runs" / "tune"), help="Tune storage (dir or s3://)")
    ap.add_argument("--name", default="tune_video", help="experiment name")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    args = ap.parse_args()

    root = prepare_shared_data()
    experiment = fs.join(args.storage_path, args.name)
    space_path = REPO / "runs" / "tune_specs" / f"{args.name}.yaml"
    if not args.resume:
        write_space(space_path, root, args)
    summary = run_sweep(str(space_path), storage_path=args.storage_path, name=args.name, resume=args.resume)
    print(json.dumps(summary, indent=1), flush=True)
    trials = json.loads(fs.read_bytes(summary["results"]))
    space = load_space(str(space_path))
    default = default_run(str(space_path), fs.join(experiment, "default_run"))
    default_cfg = space.base_config.to_dict()

    rows = []
    for t in trials:
        row = {"config": "tuned", "trial": t["trial_id"], "status": t["status"]}
        row.update({COLUMNS.get(k, k): v for k, v in t["params"].items()})
        row["best val NDCG@10"] = t["best_val_NDCG@10"]
        row.update({f"test {m}": (t["test"] or {}).get(m) for m in METRICS})
        row["evals"] = t["evals"]
        rows.append(row)
    rows.append({
        "config": "default", "trial": "-", "status": "completed",
        **{col: default_cfg[key.split(".")[0]][key.split(".")[1]] for key, col in COLUMNS.items()},
        "best val NDCG@10": default["val"]["NDCG@10"],
        **{f"test {m}": default["test"][m] for m in METRICS},
        "evals": len([r for r in _history(fs.join(experiment, "default_run")) if "val" in r]),
    })

    best = next((r for r in rows if r["trial"] == summary["best_trial"]), None)
    if best is None:
        verdict = "No trial produced a validation score; nothing to compare."
    else:
        delta = best["test NDCG@10"] - default["test"]["NDCG@10"]
        verdict = (
            f"Best tuned trial {best['trial']} (picked by validation NDCG@10 {best['best val NDCG@10']:.5f}): "
            f"test NDCG@10 {best['test NDCG@10']:.5f} vs default config {default['test']['NDCG@10']:.5f} "
            f"({delta:+.5f}): the tuned config {'beats' if delta > 0 else 'does not beat'} the default."
        )
    print(verdict)
    budget = f"{args.trials} trials x {args.steps} meta iterations, validation every {min(args.eval_every, args.steps)}" + (f", {args.target_users} target users" if args.target_users else "")
    meta = header("Ray Tune sweep of MetaRec (tau, heads, alpha, beta, inner steps) on amazon-video-games", budget)
    meta.update(experiment=experiment, sweep=summary)
    notes = [
        verdict,
        f"ASHA (grace {space.grace_period} evaluations, reduction factor {space.reduction_factor:g}) stopped "
        f"{summary['early_stopped']} of {summary['trials']} trials early; their test metrics come from their best checkpoint.",
        f"Per-trial details, best_config.yaml and sweep.png: {experiment}.",
    ]
    write_results("tune_video", meta, rows, notes, experiment="tune_video")


def _history(run_dir: str) -> list[dict]:
    return RunDir(run_dir).read_history()


if __name__ == "__main__":
    main()
