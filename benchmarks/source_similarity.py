"""Does the rescaling's similarity tell a harmful source from a useful one?

Trains MetaRec for a few hundred outer iterations and records, for every task, the cosine
s_i^p = cos(g_i^p, u_i^p) of docs/design.md Eq. (6) on each shared tensor (one the other
tasks of the iteration also touch). Per source: the mean over tasks and tensors, its
spread, and the per-iteration mean smoothed over time. If a harmful source (its sequences
shuffled, or a distant domain) has a lower mean than the useful ones, but the per-task
values are too noisy for the per-iteration softmax to separate them, the weights stay
near 1/n even though the signal is there. With `--set rescale.signal=target_gain` (or
`source_fit`) it records that signal instead (docs/design.md §4), before its standardization.

    python benchmarks/source_similarity.py --config scientific/metarec \
        --sources amazon-beauty amazon-sports amazon-video-games amazon-beauty-shuffled movielens-1m \
        --set model.dropout=0.5 --iterations 300 --experiment scientific --name source_similarity
    # the signals of rescale.signal, on the three Amazon sources plus three random copies:
    python benchmarks/source_similarity.py --sources amazon-beauty amazon-sports amazon-video-games \
        amazon-beauty-random amazon-sports-random amazon-video-games-random \
        --set model.dropout=0.5 train.batch_size=256 train.lr=0.000994 train.batch_order=epoch \
        rescale.signal=target_gain --iterations 240 --name gain_noise   # source_fit: 120, fit_noise
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile

import torch
import yaml
from common import TimedRunner, bench_config, experiment_dir, header, prepare_shared_data, write_results
from harmful_sources import harmful_copy, is_harmful

from metarec.config import config_from_dict
from metarec.train import Trainer


# what the recorded per-task value is, by `rescale.signal` (run_task puts the signal in place of the cosine)
SIGNAL_LABELS = {"cosine": "cosine", "target_gain": "target gain", "source_fit": "minus source loss"}


def shared_tensors(results) -> list[set[str]]:
    """Per task: the tensors it shares with at least one other task of the iteration."""
    counts: dict[str, int] = {}
    for r in results:
        for name in r.touched:
            counts[name] = counts.get(name, 0) + 1
    return [{n for n in r.touched if counts[n] > 1} for r in results]


def record(args) -> list[dict]:
    """One row per task: iteration, source, mean cosine over its shared tensors (and by kind)."""
    root = prepare_shared_data()
    for source in args.sources:
        if is_harmful(source):
            harmful_copy(root, source)
    overrides = {"data.root": root, "data.sources": args.sources, "seed": args.seed, "train.progress": False,
                 "train.checkpoint_every": 0}
    overrides.update({k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.set)})
    cfg = config_from_dict(bench_config(args.config, overrides))
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer.from_config(cfg, run_dir)
        timed = trainer.runner = TimedRunner(trainer.runner)
        try:
            for it in range(args.iterations):
                trainer.model.train()
                trainer.step(it)
                for r, shared in zip(timed.results, shared_tensors(timed.results)):
                    sims = [r.sims[n] for n in sorted(shared) if n in r.sims]
                    backbone = [r.sims[n] for n in sorted(shared) if n in r.sims and not n.startswith(("items.", "bias."))]
                    rows.append({"iteration": it, "source": r.source, "cosine": statistics.fmean(sims) if sims else 0.0,
                                 "backbone cosine": statistics.fmean(backbone) if backbone else 0.0, "tensors": len(sims)})
                if it % 25 == 0:
                    print(f"iteration {it}: " + ", ".join(f"{r.source} {rows[-len(timed.results) + k]['cosine']:+.3f}"
                                                         for k, r in enumerate(timed.results)), file=sys.stderr, flush=True)
        finally:
            timed.close()
    return rows


def centred(rows: list[dict]) -> list[float]:
    """Each task's cosine minus the mean of its iteration's tasks: what Eq. (7)'s softmax sees."""
    means: dict[int, list[float]] = {}
    for r in rows:
        means.setdefault(r["iteration"], []).append(r["cosine"])
    return [r["cosine"] - statistics.fmean(means[r["iteration"]]) for r in rows]


def summary(rows: list[dict], sources: list[str], parts: int = 3) -> list[dict]:
    """Per source: mean, standard deviation, count of the per-task cosines, overall and per third
    of the run, and the mean and standard error of the centred cosines (`centred`)."""
    last = max(r["iteration"] for r in rows) + 1
    rows = [{**r, "centred": c} for r, c in zip(rows, centred(rows))]
    out = []
    for s in sources:
        mine = [r for r in rows if r["source"] == s]
        row = {"source": s, "tasks": len(mine),
               "mean cosine": statistics.fmean(r["cosine"] for r in mine),
               "sd": statistics.pstdev(r["cosine"] for r in mine),
               "mean centred cosine": statistics.fmean(r["centred"] for r in mine),
               "its standard error": statistics.pstdev(r["centred"] for r in mine) / len(mine) ** 0.5,
               "mean backbone cosine": statistics.fmean(r["backbone cosine"] for r in mine)}
        for k in range(parts):
            lo, hi = k * last // parts, (k + 1) * last // parts
            part = [r["cosine"] for r in mine if lo <= r["iteration"] < hi]
            row[f"mean, iterations {lo}-{hi - 1}"] = statistics.fmean(part) if part else float("nan")
        out.append(row)
    return out


def plot(rows: list[dict], sources: list[str], path, beta: float = 0.95, ylabel: str = "cos(target meta gradient, source step)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for s in sources:
        ema, xs, ys = None, [], []
        for r in (r for r in rows if r["source"] == s):
            ema = r["cosine"] if ema is None else beta * ema + (1 - beta) * r["cosine"]
            xs.append(r["iteration"])
            ys.append(ema)
        ax.plot(xs, ys, label=s)
    ax.set_xlabel("outer iteration")
    ax.set_ylabel(f"{ylabel}, EMA {beta}")
    ax.set_title("per-source rescaling signal over training (shared tensors)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="scientific/metarec", help="a config under configs/ (without .yaml)")
    ap.add_argument("--sources", nargs="+", required=True)
    ap.add_argument("--set", nargs="*", default=[], help="KEY=VALUE overrides")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experiment", default="scientific")
    ap.add_argument("--name", default="source_similarity")
    ap.add_argument("--from-tasks", action="store_true", help="summarize the recorded NAME_tasks.json again instead of training")
    args = ap.parse_args()
    tasks = experiment_dir(args.experiment) / f"{args.name}_tasks.json"
    rows = json.loads(tasks.read_text()) if args.from_tasks else record(args)
    signal = next((yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.set) if k == "rescale.signal"), "cosine")
    label = SIGNAL_LABELS[signal]
    table = [{k.replace("cosine", label): v for k, v in r.items()} for r in summary(rows, args.sources)]
    what = "similarity of the rescaling (Eq. 6)" if signal == "cosine" else f"rescaling signal `{signal}` ({label}, before standardization)"
    meta = header(f"Per-source {what} over MetaRec training", f"{args.iterations} outer iterations, seed {args.seed}, one thread")
    write_results(args.name, meta, table, experiment=args.experiment)
    if not args.from_tasks:
        tasks.write_text(json.dumps(rows) + "\n")
    plot(rows, args.sources, experiment_dir(args.experiment) / f"{args.name}.png", **({} if signal == "cosine" else {"ylabel": label}))
    for r in table:
        print(r)


if __name__ == "__main__":
    main()
