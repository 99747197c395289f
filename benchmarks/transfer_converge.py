"""Transfer at convergence: MetaRec vs tuned target-only baselines, joint training and the
ablations, across target sizes.

Every run trains until early stopping on target validation NDCG@10: validation every
`--eval-fraction` of a target epoch (counted in target sequences seen, so a MetaRec
iteration, which sees n target batches, is validated as often per target sequence as a
target-only step), patience `--patience` evaluations; a run whose patience has not run out
when it reaches `--max-steps` is recorded with `converged: false`. Test metrics come from the best-validation
checkpoint.

A *group* is (target dataset, target users). The target is subsampled once per group
with a fixed seed (`data.subsample_seed`, so every method and seed sees the same users)
and compacted to the items those users hold (`data.subsample_items: compact`), as a
small domain of its own would be. Seeds vary the initialisation, dropout and batches.

    # runs (one JSON row per finished run, appended to benchmarks/results/transfer_converge/NAME.jsonl;
    # finished runs are skipped, so an interrupted command just continues):
    python benchmarks/transfer_converge.py run --target-users 1000 3000 --seeds 0 1 2 --jobs 2
    # ad-hoc variants: METHOD+key=value+...
    python benchmarks/transfer_converge.py run --methods metarec+meta.persist_shared=1+meta.inner_lr=3
    # tuned methods (METHOD_tuned) come from `metarec tune` searches, see tune_converge.py
    # the report (JSON + Markdown, paired bootstrap over test users, plot):
    python benchmarks/transfer_converge.py report
    # rerun committed rows from the full config each row records (`config`), and compare:
    python benchmarks/transfer_converge.py rerun --name scientific --methods lru_target_only --seeds 0
    # ... only to the first validation, compared with the row's stored curve (minutes, not hours):
    python benchmarks/transfer_converge.py rerun --name scientific --methods lru_target_only --first-eval

Per-run details (validation curve, per-source weights over time, per-user test NDCG@10
for the bootstrap) go to benchmarks/results/transfer_converge/NAME_runs/. The base config
is configs/converge/metarec_video_1k.yaml; the statistics are metarec.compare's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
import yaml
from common import PREPARED, REPO, bench_config, experiment_dir, header, machine, ndcg_at_10, paired_bootstrap, prepare_shared_data
from harmful_sources import harmful_copy, is_harmful
from transfer import METHODS as TRANSFER_METHODS

from metarec.callbacks import Callback

DEFAULT_SOURCES = ["amazon-beauty", "amazon-sports", "yelp", "movielens-1m"]

# Method = overrides on the base config: transfer.py's methods (the paper-literal sign is
# left out). Tuned methods (METHOD_tuned) come from NAME_tuned.json (tune_converge.py).
METHODS: dict[str, dict] = {k: v for k, v in TRANSFER_METHODS.items() if k != "metarec_paper_literal"}




def base_overrides(args, root: str, target: str, users: int | None, seed: int) -> dict:
    """The protocol's settings on top of configs/converge/metarec_video_1k.yaml."""
    return {
        "name": "converge", "seed": seed, "data.root": root, "data.target": target,
        "data.sources": [s for s in args.sources if s != target], "data.max_len": args.max_len,
        "data.source_max_len": args.source_max_len, "data.target_users": users,
        "train.max_steps": args.max_steps, "train.eval_every": 1, "train.patience": args.patience,
        "train.source_negatives": args.source_negatives, "train.progress": False,
        "meta.source_batch_size": args.source_batch_size,
    }


def method_config(args, root, target, users, seed, method, tuned) -> tuple[dict, dict]:
    """(raw config, its searched overrides) of `method`: a METHODS entry or a tuned one."""
    # METHOD or METHOD+key=value+key=value (an ad-hoc variant); METHOD may be a tuned one
    name, *pairs = method.split("+")
    base, over = (tuned[name]["base"], dict(tuned[name]["overrides"])) if name in tuned else (name, {})
    over.update({k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in pairs)})
    raw = bench_config("converge/metarec_video_1k", {**base_overrides(args, root, target, users, seed), **METHODS[base], **over})
    return raw, over


# ------------------------------------------------------------------ one run


def row_config(cfg) -> dict:
    """A row's `config`: every setting of the run, defaults included, so the row reruns
    as it ran after the defaults change (`rerun`). data.root is stored relative to the
    repository (a rerun uses the local prepared data)."""
    raw = cfg.model_dump(mode="json")
    root = Path(raw["data"]["root"])
    if root.is_absolute() and root.is_relative_to(REPO):
        raw["data"]["root"] = str(root.relative_to(REPO))
    return raw


def code_commit() -> str | None:
    """The commit the benchmark runs from (a row's `commit`); None outside a git checkout."""
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def per_user_ndcg(trainer, split: str = "test") -> np.ndarray:
    """NDCG@10 of every evaluated target user for the trainer's current (best) parameters."""
    from metarec.data.batches import left_pad
    from metarec.eval import rank_of_targets
    from metarec.objective import last_position_scores

    problem = trainer.problem
    model = problem.model.eval()
    params = dict(model.named_parameters())
    histories, targets = problem.domains[problem.target].eval_examples(split)
    out = []
    with torch.no_grad():
        for start in range(0, len(targets), 512):
            inputs = torch.from_numpy(left_pad(histories[start : start + 512], problem.cfg.data.max_len))
            scores = last_position_scores(model, params, problem.target, inputs)
            out.append(ndcg_at_10(rank_of_targets(scores, torch.from_numpy(targets[start : start + 512]), inputs).numpy()))
    return np.concatenate(out)


def run_one(job: dict) -> dict:
    """Train one (group, method, seed) to early stopping; returns its row (also saves details)."""
    torch.set_num_threads(job["threads"])
    from metarec.config import config_from_dict
    from metarec.train import Trainer

    raw = job["config"]
    cfg = config_from_dict(raw)
    test_curve = CurveOnTest() if job.get("test_curve") else None
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer.from_config(cfg, run_dir, callbacks=[test_curve] if test_curve else ())
        windows = len(trainer.problem.windows[cfg.data.target])
        per_step = cfg.train.batch_size * (cfg.meta.tasks_per_iter if cfg.method != "target_only" else 1)
        # a rerun keeps the row's eval_every; a new run validates every eval_fraction of a target epoch
        eval_every = job.get("eval_every") or max(1, round(job["eval_fraction"] * windows / per_step))
        trainer.cfg.train.eval_every = eval_every
        start = time.perf_counter()
        m = trainer.fit()
        wall = time.perf_counter() - start
        users = per_user_ndcg(trainer)
        history = trainer.state.history
    stopped_early = trainer.state.evals_since_best >= cfg.train.patience  # patience ran out, even at the step cap
    row = {
        "dataset": cfg.data.target, "target_users": cfg.data.target_users, "method": job["method"], "seed": cfg.seed,
        **({"source_set": job["source_set"], "sources": list(cfg.data.sources)} if job.get("source_set") else {}),
        **{k: m["test"][k] for k in ("NDCG@10", "Recall@10", "MRR")},
        "val NDCG@10": m["val"]["NDCG@10"], "best_step": m["best_step"], "steps": m["steps"], "converged": stopped_early,
        "eval_every": eval_every, "target_sequences_seen": m["steps"] * per_step,
        "train_seconds": round(m["train_seconds"], 1), "wall_seconds": round(wall, 1), "device": machine(),
        "overrides": job["overrides"], "config": row_config(trainer.cfg),
        **({"commit": job["commit"]} if job.get("commit") else {}),
    }
    if test_curve:
        best_test_step, best_test = max(test_curve.curve, key=lambda point: point[1])
        row.update({"max test NDCG@10 over evaluations": best_test, "step of the max": best_test_step})
    if m["source_weights"]:
        row["final source weights"] = {k: round(v, 4) for k, v in m["source_weights"][-1].items() if k != "step"}
    detail = {
        "row": row,
        "val_curve": [[r["step"], r["val"]["NDCG@10"]] for r in history if "val" in r],
        "source_weights": m["source_weights"],
        "test_ndcg10_per_user": [round(float(x), 5) for x in users],
        **({"test_curve": test_curve.curve} if test_curve else {}),
    }
    path = Path(job["detail_path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(detail))
    return row


class CurveOnTest(Callback):
    """Test NDCG@10 after every validation (a diagnostic: what picking the checkpoint on test would give)."""

    def __init__(self) -> None:
        self.curve: list[list] = []

    def on_eval(self, row: dict, trainer) -> None:
        from metarec.problem import target_metrics

        self.curve.append([row["step"], target_metrics(trainer.problem, "test")["NDCG@10"]])


def detail_path(name: str, row_key: tuple, stem: str | None = None) -> str:
    """A run's details: benchmarks/results/NAME/STEM_runs/GROUP/METHOD-seedS.json (STEM defaults to NAME)."""
    dataset, users, method, seed, source_set = row_key
    group = f"{dataset}-{users or 'all'}" + (f"-{source_set}" if source_set else "")
    return str(experiment_dir(name) / f"{stem or name}_runs" / group / f"{method}-seed{seed}.json")


def rows_path(name: str, stem: str | None = None) -> Path:
    """The rows file, one JSON row per finished run: benchmarks/results/NAME/STEM.jsonl (STEM defaults to NAME)."""
    return experiment_dir(name) / f"{stem or name}.jsonl"


def load_rows(name: str, stem: str | None = None) -> list[dict]:
    path = rows_path(name, stem)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def key_of(row: dict) -> tuple:
    return (row["dataset"], row["target_users"], row["method"], row["seed"], row.get("source_set"))


def run_jobs(args, jobs: list[dict], stem: str | None = None) -> list[dict]:
    """Run the jobs (args.jobs at a time), appending each finished row to NAME/STEM.jsonl."""
    out_path = rows_path(args.name, stem)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    if not jobs:
        return rows
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, job): job for job in jobs}
        for future in as_completed(futures):  # write each row as soon as its run ends
            job = futures[future]
            try:
                row = future.result()
            except Exception as err:  # record and go on: one failed run must not lose the others
                print(f"FAILED {job['method']} seed {job['seed']}: {err!r}", file=sys.stderr, flush=True)
                continue
            with out_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("dataset", "target_users", "method", "seed", "NDCG@10", "val NDCG@10", "best_step", "steps", "converged", "train_seconds")}), flush=True)
            rows.append(row)
    return rows


def load_tuned(name: str) -> dict:
    path = experiment_dir(name) / f"{name}_tuned.json"
    return json.loads(path.read_text()) if path.exists() else {}


def cmd_run(args, stem: str | None = None, **job_options) -> None:
    """Run the runs not yet in NAME/STEM.jsonl (STEM defaults to NAME); `job_options` go
    into every job (`test_curve=True`: test NDCG@10 after every validation)."""
    root = prepare_shared_data()
    for source in args.sources:
        if is_harmful(source):
            harmful_copy(root, source)
    tuned = load_tuned(args.name)
    commit = code_commit()
    done = {key_of(r) for r in load_rows(args.name, stem)}
    jobs = []
    for users in args.target_users:
        users = users or None
        for seed in args.seeds:
            for method in args.methods:
                key = (args.target, users, method, seed, args.source_set)
                if key in done:
                    continue
                raw, over = method_config(args, root, args.target, users, seed, method, tuned)
                jobs.append({
                    "method": method, "seed": seed, "threads": args.threads, "eval_fraction": args.eval_fraction, "source_set": args.source_set,
                    "config": raw, "overrides": over, "detail_path": detail_path(args.name, key, stem), "commit": commit, **job_options,
                })
    print(f"{len(jobs)} runs to do ({len(done)} already in {stem or args.name}.jsonl)", file=sys.stderr, flush=True)
    run_jobs(args, jobs, stem)


def row_matches(row: dict, ap: argparse.ArgumentParser, args) -> bool:
    """The rows `rerun` selects: those matching every selection option given (not left at its default)."""
    def given(name):
        value = getattr(args, name)
        return None if value == ap.get_default(name) else value
    checks = [
        (given("methods"), lambda v: row["method"] in v), (given("seeds"), lambda v: row["seed"] in v),
        (given("target"), lambda v: row["dataset"] == v), (given("source_set"), lambda v: row.get("source_set") == v),
        (given("target_users"), lambda v: row["target_users"] in {u or None for u in v}),
    ]
    return all(value is None or check(value) for value, check in checks)


def cmd_rerun(args, ap: argparse.ArgumentParser) -> None:
    """Rerun the selected rows of NAME/STEM.jsonl from the config each row records, and
    compare. --first-eval stops at the first validation and compares it with the row's
    stored curve (the same data, initialisation, batches and updates give the same value);
    the comparisons are appended to NAME/STEM_reruns.jsonl. Nothing in the rows changes."""
    stem = args.stem or args.name
    rows = [r for r in load_rows(args.name, stem) if row_matches(r, ap, args)]
    if not rows:
        ap.error(f"no row of {rows_path(args.name, stem)} matches the selection")
    missing = [f"{r['method']} seed {r['seed']}" for r in rows if "config" not in r]
    if missing:
        ap.error(f"{len(missing)} selected rows record no config (e.g. {missing[0]}); see benchmarks/backfill_row_configs.py")
    root = prepare_shared_data()
    jobs, tmp = [], tempfile.mkdtemp(prefix="rerun-")
    for i, row in enumerate(rows):
        raw = json.loads(json.dumps(row["config"]))
        raw["data"]["root"] = root
        for source in raw["data"]["sources"]:
            if is_harmful(source):
                harmful_copy(root, source)
        if args.first_eval:
            raw["train"]["max_steps"] = raw["train"]["eval_every"]
        jobs.append({"method": row["method"], "seed": row["seed"], "threads": args.threads, "eval_every": raw["train"]["eval_every"],
                     "source_set": row.get("source_set"), "config": raw, "overrides": row["overrides"], "detail_path": f"{tmp}/{i}.json", "row": row})
    print(f"rerunning {len(jobs)} rows of {rows_path(args.name, stem)}" + (" to their first validation" if args.first_eval else ""), file=sys.stderr, flush=True)
    out_path = experiment_dir(args.name) / f"{stem}_reruns.jsonl"
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, {k: v for k, v in job.items() if k != "row"}): job for job in jobs}
        for future in as_completed(futures):
            job, row = futures[future], futures[future]["row"]
            new = future.result()
            check = {"dataset": row["dataset"], "target_users": row["target_users"], "method": row["method"], "seed": row["seed"],
                     **({"source_set": row["source_set"]} if row.get("source_set") else {}), "mode": "first_eval" if args.first_eval else "full",
                     "date": time.strftime("%Y-%m-%d"), "device": machine()}
            if args.first_eval:
                committed = json.loads(Path(detail_path(args.name, key_of(row), stem)).read_text())["val_curve"][0]
                rerun = json.loads(Path(job["detail_path"]).read_text())["val_curve"][0]
                check.update({"step": rerun[0], "committed val NDCG@10": committed[1], "rerun val NDCG@10": rerun[1],
                              "match": committed[0] == rerun[0] and abs(committed[1] - rerun[1]) <= args.tolerance})
            else:
                keys = ("NDCG@10", "Recall@10", "MRR", "val NDCG@10", "best_step", "steps")
                check.update({"committed": {k: row[k] for k in keys}, "rerun": {k: new[k] for k in keys},
                              "match": all(abs(row[k] - new[k]) <= args.tolerance for k in keys)})
            with out_path.open("a") as f:
                f.write(json.dumps(check) + "\n")
            print(json.dumps(check), flush=True)


# ---------------------------------------------------------------- the report


def cmd_report(args) -> None:
    rows = [r for r in load_rows(args.name) if "@trial" not in r["method"]]
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["target_users"], r.get("source_set")), {}).setdefault(r["method"], []).append(r)
    meta = header("Transfer at convergence: MetaRec vs tuned target-only, joint and ablations", args.budget)
    lines = [f"# {meta['title']}", "", f"- command: `{meta['command']}`", f"- machine: {meta['machine']}", f"- date: {meta['date']}", f"- budget: {meta['budget']}", ""]
    summary = []
    for (dataset, users, source_set), methods in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 10**9, kv[0][2] or "")):
        lines += [f"## {dataset}, {users or 'all'} target users" + (f", {source_set} sources" if source_set else ""), "", "| method | seeds | converged | test NDCG@10 (mean ± std) | Recall@10 | MRR | val NDCG@10 | best step | train s |", "|---|---|---|---|---|---|---|---|---|"]
        stats = {}
        for method, rs in sorted(methods.items()):
            nd = [r["NDCG@10"] for r in rs]
            s = {"dataset": dataset, "target_users": users, "source_set": source_set, "method": method, "seeds": len(rs), "converged": sum(r["converged"] for r in rs),
                 "NDCG@10": statistics.fmean(nd), "NDCG@10 std": statistics.stdev(nd) if len(nd) > 1 else 0.0,
                 "Recall@10": statistics.fmean(r["Recall@10"] for r in rs), "MRR": statistics.fmean(r["MRR"] for r in rs),
                 "val NDCG@10": statistics.fmean(r["val NDCG@10"] for r in rs)}
            stats[method] = s
            summary.append(s)
            lines.append(f"| {method} | {s['seeds']} | {s['converged']}/{s['seeds']} | {s['NDCG@10']:.5f} ± {s['NDCG@10 std']:.5f} | {s['Recall@10']:.5f} | {s['MRR']:.5f} | {s['val NDCG@10']:.5f} | "
                         f"{statistics.fmean(r['best_step'] for r in rs):.0f} | {statistics.fmean(r['train_seconds'] for r in rs):.0f} |")
        baselines = [m for m in stats if "target_only" in m]
        metas = [m for m in stats if m.startswith("metarec")]
        if baselines and metas:
            best = max(baselines, key=lambda m: stats[m]["val NDCG@10"])  # chosen on validation, never on test
            lines += ["", f"Best target-only by validation: **{best}** (test {stats[best]['NDCG@10']:.5f}). Paired difference of test NDCG@10 over test users (per user averaged over the seeds both have), 95% bootstrap interval:", ""]
            for m in metas + [x for x in stats if x.startswith("joint")]:
                seeds = sorted({r["seed"] for r in methods[m]} & {r["seed"] for r in methods[best]})
                if not seeds:
                    continue
                a = np.mean([per_user(args.name, dataset, users, m, s, source_set) for s in seeds], axis=0)
                b = np.mean([per_user(args.name, dataset, users, best, s, source_set) for s in seeds], axis=0)
                mean, lo, hi = paired_bootstrap(b, a)  # a − b: the method against the best target-only
                ratio = stats[m]["NDCG@10"] / stats[best]["NDCG@10"]
                lines.append(f"- {m} − {best}: {mean:+.5f} [{lo:+.5f}, {hi:+.5f}] (ratio of means {ratio:.3f}; seeds {seeds})")
                stats[m]["vs_best_target_only"] = {"baseline": best, "diff": mean, "ci95": [lo, hi], "ratio": ratio}
        lines.append("")
    notes_path = experiment_dir(args.name) / f"{args.name}_notes.md"
    if notes_path.exists():
        lines += [notes_path.read_text()]
    (experiment_dir(args.name) / f"{args.name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (experiment_dir(args.name) / f"{args.name}.meta.json").write_text(json.dumps({**meta, "summary": summary}, indent=1) + "\n")
    (experiment_dir(args.name) / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    plot(args.name, summary, rows)
    print("\n".join(lines))


def per_user(name, dataset, users, method, seed, source_set=None, stem: str | None = None) -> np.ndarray:
    detail = json.loads(Path(detail_path(name, (dataset, users, method, seed, source_set), stem)).read_text())
    return np.asarray(detail["test_ndcg10_per_user"])


def plot(name: str, summary: list[dict], rows: list[dict]) -> None:
    """NAME.png: test NDCG@10 per method, the validation curves of seed 0 and the per-source
    weights of a MetaRec run. Clean sources only (rows without a source set, or `clean`): the
    harmful and noise sets have their own figure (selective_transfer.py)."""
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    summary = [s for s in summary if s.get("source_set") in (None, "clean")]
    rows = [r for r in rows if r.get("source_set") in (None, "clean")]
    fig = Figure(figsize=(16, 5.6))
    ax, ax2, ax3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.2, 1, 1]})
    for axis in (ax, ax2):  # 18 distinct colours: there are often more methods than tab10 has
        axis.set_prop_cycle(color=list(colormaps["tab10"].colors) + list(colormaps["Dark2"].colors))
    if any(s["target_users"] for s in summary):  # a size curve
        for dataset in sorted({s["dataset"] for s in summary}):
            for method in sorted({s["method"] for s in summary if s["dataset"] == dataset}):
                pts = sorted((s["target_users"] or 10**6, s["NDCG@10"], s["NDCG@10 std"]) for s in summary if s["dataset"] == dataset and s["method"] == method)
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=f"{method}" + ("" if dataset == "amazon-video-games" else f" ({dataset})"))
        ax.set_xscale("log")
        ax.set_xlabel("target users")
        ax.set_ylabel("test NDCG@10 (mean ± std over seeds)")
        ax.legend(fontsize=7)
    else:  # one group (all the target's users): a bar per method, best at the top
        ranked = sorted(summary, key=lambda s: s["NDCG@10"])
        ax.barh(range(len(ranked)), [s["NDCG@10"] for s in ranked], xerr=[s["NDCG@10 std"] for s in ranked], capsize=2)
        labels = [f"{s['method']} ({s['seeds']} seed{'s' if s['seeds'] > 1 else ''})" for s in ranked]
        labels = [label.replace("+", "\n+") if len(label) > 45 else label for label in labels]
        ax.set_yticks(range(len(ranked)), labels, fontsize=6)
        # every bar's slot holds the longest label (about 0.11 inch a line at 6 pt), so none overlap
        fig.set_size_inches(16, max(5.6, 1.2 + 0.11 * len(labels) * max(label.count("\n") + 1 for label in labels)))
        low = min(s["NDCG@10"] - s["NDCG@10 std"] for s in ranked)
        ax.set_xlim(low * 0.97, max(s["NDCG@10"] + s["NDCG@10 std"] for s in ranked) * 1.01)
        ax.set_xlabel("test NDCG@10 (mean ± std over seeds)")
        ax.set_title(f"{summary[0]['dataset']}, all target users" if summary else "", fontsize=9)
    # validation curves of seed 0 in the smallest group, for the methods with the most seeds
    main = statistics.mode(r["dataset"] for r in rows) if rows else None
    rows = [r for r in rows if r["dataset"] == main]
    small = min((r["target_users"] or 10**9 for r in rows), default=None)
    most = max((s["seeds"] for s in summary if s["dataset"] == main), default=0)
    shown = {s["method"] for s in summary if s["dataset"] == main and s["seeds"] == most}
    metas = sorted({r["method"] for r in rows if r["method"].startswith("metarec")})
    weights_of = "metarec_tuned" if "metarec_tuned" in metas else (metas[0] if metas else None)
    for r in rows:
        if (r["target_users"] or 10**9) != small or r["seed"] != 0:
            continue
        if r["method"] in shown or r["method"] == weights_of:
            d = json.loads(Path(detail_path(name, key_of(r))).read_text())
        if r["method"] in shown:
            curve = d["val_curve"]
            per = r["target_sequences_seen"] / max(r["steps"], 1)
            ax2.plot([s * per for s, _ in curve], [v for _, v in curve], label=r["method"])
        if r["method"] == weights_of:
            for source in sorted({k for w in d["source_weights"] for k in w if k != "step"}):
                ax3.plot([w["step"] for w in d["source_weights"]], [w.get(source) for w in d["source_weights"]], label=source)
    ax3.set_xlabel("iteration")
    ax3.set_ylabel("mean softmax weight of the source's tasks")
    ax3.set_title(f"per-source weights over time\n{weights_of}, {main}, seed 0", fontsize=9)
    ax3.legend(fontsize=7)
    ax2.set_xlabel("target sequences seen")
    ax2.set_ylabel("val NDCG@10")
    ax2.set_title(f"validation curves, seed 0 ({most} seeds each)\n{main}, {small if small < 10**9 else 'all'} target users", fontsize=9)
    ax2.legend(fontsize=7, loc="lower right")
    if ax2.lines:  # the part where the curves differ
        top = max(max(line.get_ydata()) for line in ax2.lines)
        ax2.set_ylim(bottom=0.6 * top)
    fig.tight_layout()
    fig.savefig(experiment_dir(name) / f"{name}.png", dpi=110, bbox_inches="tight")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["run", "report", "rerun"], help="rerun: the selected committed rows, from the config each records")
    ap.add_argument("--name", default="transfer_converge", help="experiment: results go to benchmarks/results/NAME/NAME.*")
    ap.add_argument("--target", default="amazon-video-games")
    ap.add_argument("--sources", nargs="+", default=DEFAULT_SOURCES,
                    help="source domains (NAME-shuffled or NAME-random: a harmful copy of NAME, see harmful_sources.py)")
    ap.add_argument("--source-set", default=None, help="label of the source set, recorded in the rows (e.g. clean, harmful)")
    ap.add_argument("--target-users", type=int, nargs="+", default=[1000], help="0 = all users")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--patience", type=int, default=20)
    ap.add_argument("--eval-fraction", type=float, default=0.75, help="validate every this fraction of a target epoch")
    ap.add_argument("--max-len", type=int, default=20, help="target window (the small targets' users rarely exceed it)")
    ap.add_argument("--source-max-len", type=int, default=20)
    ap.add_argument("--source-batch-size", type=int, default=64)
    ap.add_argument("--source-negatives", type=int, default=1024)
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--budget", default="CPU convergence protocol (see the script's docstring)")
    ap.add_argument("--stem", default=None, help="rerun: the rows file NAME/STEM.jsonl (default NAME; e.g. refit_on_validation)")
    ap.add_argument("--first-eval", action="store_true", help="rerun: stop at the first validation and compare it with the row's curve")
    ap.add_argument("--tolerance", type=float, default=1e-6, help="rerun: largest difference that counts as a match")
    return ap


def check_methods(ap: argparse.ArgumentParser, args) -> None:
    for m in args.methods:
        if m.split("+")[0] not in METHODS and m.split("+")[0] not in load_tuned(args.name):
            ap.error(f"unknown method {m!r}")


def main() -> None:
    ap = build_parser()
    args = ap.parse_args()
    if args.command == "rerun":
        cmd_rerun(args, ap)
        return
    check_methods(ap, args)
    {"run": cmd_run, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
