"""Selective transfer: what each method loses when harmful sources join the clean ones.

Reads the rows `transfer_converge.py run` wrote with `--source-set clean` and
`--source-set harmful` (same target, method and seed) and reports, per method, the change
of test NDCG@10 from the clean to the harmful set, with a paired 95% bootstrap interval
over test users (the harmful run's per-user NDCG@10 minus the clean run's). The plot shows
each source's weight over training in every MetaRec run with the harmful set, relative to
an equal share (1 = the uniform weight 1/k of the k tasks in that iteration; a 100-
iteration moving average, since a source is in only some iterations' tasks).

    python benchmarks/transfer_converge.py run --name scientific ... --source-set clean
    python benchmarks/transfer_converge.py run --name scientific ... --source-set harmful
    python benchmarks/selective_transfer.py --name scientific
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
from common import experiment_dir, header, paired_bootstrap
from transfer_converge import detail_path, key_of, load_rows, per_user

WINDOW = 100


def pairs(rows: list[dict]) -> dict[str, list[tuple[dict, dict]]]:
    """(clean row, harmful row) per method, for every seed that has both."""
    by_key = {key_of(r): r for r in rows}
    out: dict[str, list[tuple[dict, dict]]] = {}
    for key, harmful in sorted(by_key.items(), key=lambda kv: str(kv[0])):
        if key[4] != "harmful":
            continue
        clean = by_key.get((*key[:4], "clean"))
        if clean is not None:
            out.setdefault(key[2], []).append((clean, harmful))
    return out


def summarize(name: str, method: str, runs: list[tuple[dict, dict]]) -> dict:
    clean = [c["NDCG@10"] for c, _ in runs]
    harmful = [h["NDCG@10"] for _, h in runs]
    dataset, users = runs[0][0]["dataset"], runs[0][0]["target_users"]
    seeds = [c["seed"] for c, _ in runs]
    a = np.mean([per_user(name, dataset, users, method, s, "harmful") for s in seeds], axis=0)
    b = np.mean([per_user(name, dataset, users, method, s, "clean") for s in seeds], axis=0)
    mean, lo, hi = paired_bootstrap(b, a)  # harmful − clean
    c, h = statistics.fmean(clean), statistics.fmean(harmful)
    return {
        "dataset": dataset, "target_users": users, "method": method, "seeds": seeds,
        "clean NDCG@10": c, "harmful NDCG@10": h, "change": h / c - 1, "diff": mean, "ci95": [lo, hi],
        "clean train s": statistics.fmean(r["train_seconds"] for r, _ in runs),
        "harmful train s": statistics.fmean(r["train_seconds"] for _, r in runs),
        "harmful sources": runs[0][1]["sources"],
        "final source weights (harmful)": runs[0][1].get("final source weights"),
    }


def relative_weights(detail: dict) -> dict[str, tuple[list[int], list[float]]]:
    """Per source: (iteration, moving average of k·w) over the iterations it was in."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for w in detail["source_weights"]:
        k = len(w) - 1  # the sources in this iteration's tasks (the rest of the keys)
        for source, value in w.items():
            if source != "step":
                steps, vals = series.setdefault(source, ([], []))
                steps.append(w["step"])
                vals.append(k * value)
    out = {}
    for source, (steps, vals) in series.items():
        n = min(WINDOW, len(vals))
        avg = np.convolve(vals, np.ones(n) / n, mode="valid")
        out[source] = (steps[n - 1:], avg.tolist())
    return out


def plot(name: str, rows: list[dict]) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    runs = [r for r in rows if r.get("source_set") == "harmful" and r["method"].startswith("metarec") and r["seed"] == 0]
    if not runs:
        return
    fig = Figure(figsize=(5.2 * len(runs), 4.2))
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, r in zip(axes, sorted(runs, key=lambda r: r["method"])):
        detail = json.loads(open(detail_path(name, key_of(r))).read())
        for source, (steps, avg) in sorted(relative_weights(detail).items()):
            ax.plot(steps, avg, label=source, lw=1.2)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{r['method']}\nharmful set, seed 0 (test NDCG@10 {r['NDCG@10']:.4f})", fontsize=8)
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"weight / equal share ({WINDOW}-iteration mean)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(experiment_dir(name) / f"{name}_selective.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="scientific", help="experiment (benchmarks/results/NAME/NAME.jsonl)")
    ap.add_argument("--budget", default="as in the experiment's runs (transfer_converge.py)")
    args = ap.parse_args()
    rows = [r for r in load_rows(args.name) if r.get("source_set")]
    summary = [summarize(args.name, m, runs) for m, runs in pairs(rows).items()]
    meta = header("Selective transfer: the change when harmful sources are added", args.budget)
    lines = [f"# {meta['title']}", "", f"- command: `{meta['command']}`", f"- machine: {meta['machine']}", f"- date: {meta['date']}",
             f"- budget: {meta['budget']}", "",
             "| method | seeds | clean test NDCG@10 | harmful test NDCG@10 | change | harmful − clean, paired 95% interval | train s clean / harmful |",
             "|---|---|---|---|---|---|---|"]
    for s in sorted(summary, key=lambda s: s["change"], reverse=True):
        lines.append(f"| {s['method']} | {', '.join(map(str, s['seeds']))} | {s['clean NDCG@10']:.4f} | {s['harmful NDCG@10']:.4f} | {100 * s['change']:+.1f}% | "
                     f"{s['diff']:+.4f} [{s['ci95'][0]:+.4f}, {s['ci95'][1]:+.4f}] | {s['clean train s']:.0f} / {s['harmful train s']:.0f} |")
    if summary:
        lines += ["", f"Harmful sources: {', '.join(summary[0]['harmful sources'])}. Figure: `{args.name}_selective.png`."]
    out = experiment_dir(args.name)
    (out / f"{args.name}_selective.json").write_text(json.dumps({**meta, "summary": summary}, indent=1) + "\n")
    (out / f"{args.name}_selective.md").write_text("\n".join(lines) + "\n")
    plot(args.name, rows)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
