"""How much would picking the checkpoint (or the seed) on test inflate a result?

A diagnostic for the gap to a published number (issue 19 point 1): it reruns
`transfer_converge.py` runs, with the same options and so the same configs, and also
evaluates test NDCG@10 after every validation. Training is unchanged (the test pass runs
in eval mode and draws no random numbers), so the test at the best-validation checkpoint
must equal the `transfer_converge` row of the same method and seed. Each row adds the
largest test NDCG@10 over the evaluations ("picked on test") and its step; the report
compares, over the seeds, the protocol's figure (mean of the best-validation checkpoints'
test), the mean of the per-seed test maxima, and the best seed's maximum.

    python benchmarks/picked_on_test.py --name scientific --target amazon-scientific --target-users 0 \\
        --sources amazon-beauty amazon-sports amazon-video-games --methods "lru_target_only_tuned+train.batch_order=epoch" --seeds 0 1 2

Rows: benchmarks/results/NAME/picked_on_test.jsonl (one per finished run; finished runs
are skipped), curves in picked_on_test_runs/, report picked_on_test.{json,md}.
"""

from __future__ import annotations

import json
import statistics
import sys

import transfer_converge as tc
from common import header, write_results

OUT = "picked_on_test"


def main() -> None:
    ap = tc.build_parser()
    ap.description = __doc__
    args = ap.parse_args(["run", *sys.argv[1:]])
    tc.check_methods(ap, args)
    tc.cmd_run(args, stem=OUT, test_curve=True)
    report(args, tc.load_rows(args.name, OUT), tc.load_rows(args.name))


def report(args, rows: list[dict], protocol_rows: list[dict]) -> None:
    recorded = {(r["dataset"], r["target_users"], r["method"], r["seed"]): r["NDCG@10"] for r in protocol_rows if not r.get("source_set") or r["source_set"] == "clean"}
    summary = []
    for key in sorted({(r["dataset"], r["target_users"], r["method"]) for r in rows}, key=str):
        rs = sorted((r for r in rows if (r["dataset"], r["target_users"], r["method"]) == key), key=lambda r: r["seed"])
        at_val = [r["NDCG@10"] for r in rs]
        at_max = [r["max test NDCG@10 over evaluations"] for r in rs]
        same = [recorded.get((*key, r["seed"])) for r in rs]
        summary.append({
            "dataset": key[0], "target_users": key[1] or "all", "method": key[2], "seeds": len(rs),
            "test at the best-validation checkpoint (mean)": statistics.mean(at_val),
            "test, checkpoint picked on test (mean)": statistics.mean(at_max),
            "test, checkpoint and seed picked on test": max(at_max),
            "inflation, checkpoint on test": statistics.mean(at_max) / statistics.mean(at_val),
            "inflation, checkpoint and seed on test": max(at_max) / statistics.mean(at_val),
            "equals the transfer_converge rows": all(s is not None and abs(s - v) < 1e-9 for s, v in zip(same, at_val)),
        })
    meta = header("Checkpoint and seed picked on test: how much they would inflate a result", args.budget)
    write_results(OUT, meta, summary, experiment=args.name)
    for row in summary:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
