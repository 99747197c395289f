"""How much would training on the validation item add? (issue 19 point 1, a protocol probe)

Some evaluation protocols refit the model on the training *and* validation items before
testing, with the training length chosen on validation. This probe measures what that
refit adds to a `transfer_converge.py` result: for each method it reads the method's
protocol rows (same name, target, seeds, clean sources), takes the mean of their
best-validation steps as the training length (so the length is chosen on validation, never
on test), and reruns every seed with `data.train_on_validation: true` and
`train.max_steps` = that length (`--steps-seeds` takes it from other seeds' runs, so a
seed added later keeps the length the first ones chose); the run tests its last step. The report compares each
refit with the protocol run of the same method and seed, paired over test users.

    python benchmarks/refit_on_validation.py --name scientific --target amazon-scientific --target-users 0 \\
        --sources amazon-beauty amazon-sports amazon-video-games --source-set clean \\
        --methods lru_target_only_wide_tuned joint_tuned metarec_tuned --seeds 0 1 2

Rows: benchmarks/results/NAME/refit_on_validation.jsonl (one per finished run; finished
runs are skipped), per-run details in refit_on_validation_runs/, report
refit_on_validation.{json,md}; with a target-only method among --methods, each other method's refit is
also compared with the target-only refit (paired over test users).
"""

from __future__ import annotations

import json
import statistics
import sys

import numpy as np
import transfer_converge as tc
from common import header, paired_bootstrap, write_results

OUT = "refit_on_validation"


def in_group(row: dict, args) -> bool:
    """Is `row` a run on this command's target, target size and source set (or unlabelled sources)?"""
    return row["dataset"] == args.target and row["target_users"] == args.users and row.get("source_set") in (None, args.source_set)


def refit_method(method: str, protocol_rows: list[dict], args) -> str:
    """METHOD+data.train_on_validation=true+train.max_steps=N, N the mean best-validation step of its protocol rows."""
    length_seeds = args.steps_seeds or args.seeds
    steps = [r["best_step"] for r in protocol_rows if in_group(r, args) and r["method"] == method and r["seed"] in length_seeds]
    if len(steps) < len(length_seeds):
        sys.exit(f"{method}: {len(steps)} of {len(length_seeds)} seeds in benchmarks/results/{args.name}/{args.name}.jsonl; run them first")
    return f"{method}+data.train_on_validation=true+train.max_steps={round(statistics.fmean(steps))}"


def main() -> None:
    ap = tc.build_parser()
    ap.description = __doc__
    ap.add_argument("--steps-seeds", type=int, nargs="+", metavar="SEED",
                    help="the seeds whose protocol runs set the training length (default: --seeds); "
                         "lets a later seed join refits whose length earlier seeds chose")
    args = ap.parse_args(["run", *sys.argv[1:]])
    tc.check_methods(ap, args)
    if len(args.target_users) != 1:
        ap.error("one --target-users value at a time")
    args.users = args.target_users[0] or None
    protocol_rows = tc.load_rows(args.name)
    plain = list(args.methods)
    args.methods = [refit_method(m, protocol_rows, args) for m in plain]
    tc.cmd_run(args, stem=OUT)
    report(args, dict(zip(args.methods, plain)), tc.load_rows(args.name, OUT), protocol_rows)


def seed_mean_per_user(args, stem: str | None, method: str, seeds: list[int]) -> np.ndarray:
    """Per-user test NDCG@10 of `method`, averaged over `seeds` (the bootstrap's input)."""
    return np.mean([tc.per_user(args.name, args.target, args.users, method, s, args.source_set, stem) for s in seeds], axis=0)


def report(args, refits: dict[str, str], rows: list[dict], protocol_rows: list[dict]) -> None:
    def rows_of(rs: list[dict], method: str, seeds: list[int]) -> list[dict]:
        return [next(r for r in rs if in_group(r, args) and r["method"] == method and r["seed"] == s) for s in seeds]

    summary, refit_users = [], {}
    for refit, plain in refits.items():
        seeds = sorted(r["seed"] for r in rows if in_group(r, args) and r["method"] == refit and r["seed"] in args.seeds)
        if not seeds:
            continue
        before, after = rows_of(protocol_rows, plain, seeds), rows_of(rows, refit, seeds)
        refit_users[refit] = seed_mean_per_user(args, OUT, refit, seeds)
        diff, lo, hi = paired_bootstrap(seed_mean_per_user(args, None, plain, seeds), refit_users[refit])
        protocol_mean, refit_mean = (statistics.fmean(r["NDCG@10"] for r in rs) for rs in (before, after))
        summary.append({
            "dataset": args.target, "method": plain, "refit": refit, "seeds": seeds,
            "steps": after[0]["steps"],
            "test NDCG@10, protocol (mean)": protocol_mean,
            "test NDCG@10, refit (mean)": refit_mean,
            "Recall@10, refit (mean)": statistics.fmean(r["Recall@10"] for r in after),
            "MRR, refit (mean)": statistics.fmean(r["MRR"] for r in after),
            "refit / protocol": refit_mean / protocol_mean,
            "refit - protocol": diff, "95% interval, low": lo, "95% interval, high": hi,
            "per seed (protocol, refit)": [[r["NDCG@10"], q["NDCG@10"]] for r, q in zip(before, after)],
            "train seconds, refit (mean)": statistics.fmean(r["train_seconds"] for r in after),
        })
    base = next((s for s in summary if "target_only" in s["method"]), None)
    for s in summary:  # transfer against the target-only, both refit
        if base is None or s is base or s["seeds"] != base["seeds"]:
            continue
        diff, lo, hi = paired_bootstrap(refit_users[base["refit"]], refit_users[s["refit"]])
        s.update({"refit / target-only refit": s["test NDCG@10, refit (mean)"] / base["test NDCG@10, refit (mean)"],
                  "refit - target-only refit": diff, "its 95% interval, low": lo, "its 95% interval, high": hi})
    meta = header("Refit on training + validation items: what it adds to the protocol's test NDCG@10", args.budget)
    write_results(OUT, meta, summary, experiment=args.name)
    for row in summary:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
