"""Selective transfer: what each method loses when harmful sources join the clean ones.

Reads the rows `transfer_converge.py run` wrote with `--source-set clean` and with any
other source set (e.g. `harmful`; same target, method and seed) and reports, per method and
set, the change of test NDCG@10 from the clean set, with a paired 95% bootstrap interval
over test users (the other set's per-user NDCG@10 minus the clean run's). The plots show
each source's weight over training in every MetaRec run with a non-clean set, relative to
an equal share (1 = the uniform weight 1/k of the k tasks in that iteration), averaged
over the source's last 100 iterations with a task (a source is in only some iterations).

    python benchmarks/transfer_converge.py run --name scientific ... --source-set clean
    python benchmarks/transfer_converge.py run --name scientific ... --source-set harmful
    python benchmarks/selective_transfer.py --name scientific
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from common import experiment_dir, header, paired_bootstrap
from transfer_converge import detail_path, key_of, load_rows, per_user

WINDOW = 100


def pairs(rows: list[dict]) -> dict[tuple[str, str], list[tuple[dict, dict]]]:
    """(clean row, other row) per (method, other source set), for every seed that has both."""
    by_key = {key_of(r): r for r in rows}
    out: dict[tuple[str, str], list[tuple[dict, dict]]] = {}
    for key, other in by_key.items():
        if key[4] in (None, "clean"):
            continue
        clean = by_key.get((*key[:4], "clean"))
        if clean is not None:
            out.setdefault((key[2], key[4]), []).append((clean, other))
    return out


def summarize(name: str, method: str, source_set: str, runs: list[tuple[dict, dict]]) -> dict:
    clean = [c["NDCG@10"] for c, _ in runs]
    other = [h["NDCG@10"] for _, h in runs]
    dataset, users = runs[0][0]["dataset"], runs[0][0]["target_users"]
    seeds = [c["seed"] for c, _ in runs]
    a = np.mean([per_user(name, dataset, users, method, s, source_set) for s in seeds], axis=0)
    b = np.mean([per_user(name, dataset, users, method, s, "clean") for s in seeds], axis=0)
    mean, lo, hi = paired_bootstrap(b, a)  # the set − clean
    c, h = statistics.fmean(clean), statistics.fmean(other)
    return {
        "dataset": dataset, "target_users": users, "method": method, "source_set": source_set, "seeds": seeds,
        "clean NDCG@10": c, "set NDCG@10": h, "change": h / c - 1, "diff": mean, "ci95": [lo, hi],
        "clean train s": statistics.fmean(r["train_seconds"] for r, _ in runs),
        "set train s": statistics.fmean(r["train_seconds"] for _, r in runs),
        "set sources": runs[0][1]["sources"],
        "final source weights (set)": runs[0][1].get("final source weights"),
    }


def relative_weights(detail: dict) -> dict[str, tuple[list[int], list[float]]]:
    """Per source: (iteration, mean k·w over its last WINDOW iterations with a task), k tasks per iteration."""
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


def plot(name: str, rows: list[dict]) -> list[str]:
    """Per-source weights over training, seed 0: one figure per base entry (the method name before
    its first '+'), one panel per (source set, method) in it. Returns the figures' file names."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib not installed: no plot")
        return []
    runs = [r for r in rows if r.get("source_set") not in (None, "clean") and r["method"].startswith("metarec") and r["seed"] == 0
            and r["overrides"].get("rescale.enabled", True)]  # without rescaling every weight is 1
    files = []
    for base in sorted({r["method"].split("+")[0] for r in runs}):
        group = [r for r in runs if r["method"].split("+")[0] == base]
        sets = sorted({r["source_set"] for r in group})
        methods = sorted({r["method"] for r in group})
        fig = Figure(figsize=(5.2 * len(methods), 4.2 * len(sets)))
        axes = fig.subplots(len(sets), len(methods), squeeze=False)
        for r in group:
            ax = axes[sets.index(r["source_set"])][methods.index(r["method"])]
            detail = json.loads(Path(detail_path(name, key_of(r))).read_text())
            for source, (steps, avg) in sorted(relative_weights(detail).items()):
                ax.plot(steps, avg, label=source, lw=1.2)
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_title(f"{r['method']}\n{r['source_set']} sources, seed 0 (test NDCG@10 {r['NDCG@10']:.4f})", fontsize=8)
            ax.set_xlabel("iteration")
            ax.set_ylabel(f"weight / equal share (mean of its last {WINDOW} tasks)")
            ax.legend(fontsize=7)
        for ax in axes.flat:
            ax.set_visible(ax.has_data())  # a (set, method) pair not run
        fig.tight_layout()
        files.append(f"{name}_selective_{base}.png")
        fig.savefig(experiment_dir(name) / files[-1], dpi=110)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="scientific", help="experiment (benchmarks/results/NAME/NAME.jsonl)")
    ap.add_argument("--budget", default="as in the experiment's runs (transfer_converge.py)")
    args = ap.parse_args()
    rows = [r for r in load_rows(args.name) if r.get("source_set")]
    summary = [summarize(args.name, m, s, runs) for (m, s), runs in pairs(rows).items()]
    meta = header("Selective transfer: the change when harmful sources are added", args.budget)
    lines = [f"# {meta['title']}", "", f"- command: `{meta['command']}`", f"- machine: {meta['machine']}", f"- date: {meta['date']}",
             f"- budget: {meta['budget']}", "",
             "| source set | method | seeds | clean test NDCG@10 | with the set | change | set − clean, paired 95% interval | train s clean / set |",
             "|---|---|---|---|---|---|---|---|"]
    for s in sorted(summary, key=lambda s: (s["source_set"], -s["change"])):
        lines.append(f"| {s['source_set']} | {s['method']} | {', '.join(map(str, s['seeds']))} | {s['clean NDCG@10']:.4f} | {s['set NDCG@10']:.4f} | {100 * s['change']:+.1f}% | "
                     f"{s['diff']:+.4f} [{s['ci95'][0]:+.4f}, {s['ci95'][1]:+.4f}] | {s['clean train s']:.0f} / {s['set train s']:.0f} |")
    for source_set in sorted({s["source_set"] for s in summary}):
        sources = next(s["set sources"] for s in summary if s["source_set"] == source_set)
        lines += ["", f"Sources of the {source_set} set: {', '.join(sources)}."]
    figures = plot(args.name, rows)
    lines += ["", "Figures (per-source weights over training, one per base entry): " + ", ".join(f"`{f}`" for f in figures) + "."]
    out = experiment_dir(args.name)
    (out / f"{args.name}_selective.json").write_text(json.dumps({**meta, "summary": summary}, indent=1) + "\n")
    (out / f"{args.name}_selective.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
