"""A `metarec tune` search at the convergence protocol, recorded for the transfer benchmark.

Runs the sweep of a space file (every trial trains until early stopping on target
validation NDCG@10), writes benchmarks/results/transfer_converge/NAME.{json,md} (one row
per trial: the sampled parameters, best validation NDCG@10, test metrics, status) and
records the best trial's parameters (picked by validation, never by test) as METHOD_tuned
(or `--entry NAME`) in benchmarks/results/transfer_converge/transfer_converge_tuned.json, where
`transfer_converge.py run --methods METHOD_tuned` picks them up.

    python benchmarks/tune_converge.py tune/spaces/converge_target_only_1k.yaml --method lru_target_only --name tune_converge_target_only_1k
    python benchmarks/tune_converge.py tune/spaces/converge_metarec_1k.yaml --method metarec --name tune_converge_metarec_1k
    # the paper's Scientific target (results and tuned file in benchmarks/results/scientific/)
    python benchmarks/tune_converge.py tune/spaces/scientific_target_only.yaml --method lru_target_only --name tune_target_only --experiment scientific --tuned-file scientific_tuned.json
    python benchmarks/tune_converge.py tune/spaces/scientific_metarec.yaml --method metarec --name tune_metarec --experiment scientific --tuned-file scientific_tuned.json --backbone metarec_tuned_backbone
"""

from __future__ import annotations

import argparse
import json

from common import METRICS, REPO, experiment_dir, header, prepare_shared_data, write_results

from metarec import fs
from tune.sweep import run_sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("space")
    ap.add_argument("--method", required=True, help="the transfer_converge method whose tuned variant this is")
    ap.add_argument("--name", required=True, help="results file stem (benchmarks/results/EXPERIMENT/NAME.*) and sweep name")
    ap.add_argument("--storage-path", default=str(REPO / "runs" / "tune"))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--tuned-file", default="transfer_converge_tuned.json")
    ap.add_argument("--entry", metavar="NAME", help="the tuned file's entry to record the best trial as (default: METHOD_tuned)")
    ap.add_argument("--backbone", metavar="TUNED_ENTRY",
                    help="an entry of the tuned file (e.g. metarec_tuned_backbone) whose overrides the tuned entry "
                         "starts from: the settings of the space's base config and overrides (its backbone, "
                         "batch size) that transfer_converge.py's own base config lacks")
    ap.add_argument("--experiment", default="transfer_converge",
                    help="results folder benchmarks/results/EXPERIMENT/ (rows and the tuned file)")
    args = ap.parse_args()
    tuned_path = experiment_dir(args.experiment) / args.tuned_file
    tuned = json.loads(tuned_path.read_text()) if tuned_path.exists() else {}
    if args.backbone is not None and args.backbone not in tuned:
        raise SystemExit(f"error: --backbone {args.backbone}: no such entry in {tuned_path}")
    backbone = tuned[args.backbone]["overrides"] if args.backbone else {}
    prepare_shared_data()
    summary = run_sweep(args.space, storage_path=args.storage_path, name=args.name, resume=args.resume)
    trials = json.loads(fs.read_bytes(summary["results"]))
    rows = []
    for t in trials:
        row = {"trial": t["trial_id"], "status": t["status"], **t["params"], "best val NDCG@10": t["best_val_NDCG@10"], "best_step": t["best_step"], "evals": t["evals"]}
        row.update({f"test {m}": (t["test"] or {}).get(m) for m in METRICS})
        rows.append(row)
    scored = [r for r in rows if r["best val NDCG@10"] is not None]
    best = max(scored, key=lambda r: r["best val NDCG@10"])
    params = next(t["params"] for t in trials if t["trial_id"] == best["trial"])
    entry = args.entry or f"{args.method}_tuned"
    tuned[entry] = {"base": args.method, "overrides": {**backbone, **params}, "val NDCG@10": best["best val NDCG@10"], "trials": len(rows), "search": args.name}
    tuned_path.write_text(json.dumps(tuned, indent=1) + "\n")
    meta = header(f"metarec tune at the convergence protocol: {args.method}", f"{len(rows)} trials, each until early stopping ({args.space})")
    meta["sweep"] = summary
    notes = [f"Best trial by validation NDCG@10: {best['trial']} {params} (val {best['best val NDCG@10']:.5f}); "
             f"recorded as {entry} in {args.tuned_file}. Tuned vs default on the same seeds: transfer_converge.md."]
    write_results(args.name, meta, rows, notes, experiment=args.experiment)
    print(notes[0])


if __name__ == "__main__":
    main()
