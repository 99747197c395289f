"""The benchmark harness: what every script in benchmarks/ shares.

- data: `prepare_shared_data()` prepares ../shared/data once;
- configs: `bench_config(base, overrides)` is a YAML config from configs/ with dotted-key
  overrides (`set_dotted`), so no script spells out a model or optimizer of its own;
- timing: `TimedRunner` and `timed_iterations` time `Trainer.step` and see each task's
  result, for the runner comparisons;
- statistics: per-user NDCG@10 and the paired bootstrap are `metarec.compare`'s;
- results: one folder per experiment, `benchmarks/results/<experiment>/NAME.{json,meta.json,md}`
  (`write_results`), with the command, machine, date and budget in every file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml

from metarec.compare import ndcg_at_10, paired_bootstrap  # noqa: F401  (the statistics of every report)
from metarec.config import set_dotted

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CONFIGS = REPO / "configs"
PREPARED = REPO / ".cache" / "prepared"
METRICS = ("NDCG@10", "Recall@10", "MRR")


def prepare_shared_data() -> str:
    """Prepare ../shared/data into .cache/prepared (idempotent); returns the root."""
    from metarec.data.prepare import prepare_shared

    prepare_shared(str(PREPARED))
    return str(PREPARED)


# ------------------------------------------------------------------ configs


def bench_config(base: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The raw config `configs/<base>.yaml` with `overrides` ({"train.lr": 3e-3, ...})
    applied; every benchmark run starts from one of the shipped configs."""
    raw = yaml.safe_load((CONFIGS / f"{base}.yaml").read_text())
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value, f"benchmark override {key}")
    return raw


# ------------------------------------------------------------------ timing


class TimedRunner:
    """Wraps a runner: wall time of the last `run_tasks` and its per-task results."""

    def __init__(self, inner):
        self.inner, self.seconds, self.results = inner, 0.0, []

    def run_tasks(self, params, specs):
        start = time.perf_counter()
        self.results = self.inner.run_tasks(params, specs)
        self.seconds = time.perf_counter() - start
        return self.results

    def close(self):
        self.inner.close()


def timed_iterations(trainer, warmup: int, iterations: int) -> list[dict[str, Any]]:
    """Run `warmup` untimed then `iterations` timed `trainer.step`s; per timed step: its
    seconds, the seconds inside `run_tasks`, the summed task seconds, the busiest worker's
    task seconds (`critical`), and the task results by worker slot (local: slot 0)."""
    timed = trainer.runner = TimedRunner(trainer.runner)
    out = []
    try:
        for it in range(warmup + iterations):
            start = time.perf_counter()
            trainer.step(it)
            seconds = time.perf_counter() - start
            if it < warmup:
                continue
            assignment = getattr(timed.inner, "last_assignment", {r.index: 0 for r in timed.results})
            by_slot: dict[int, list] = {}
            for r in timed.results:
                by_slot.setdefault(assignment[r.index], []).append(r)
            busy = [sum(r.stats["seconds"] for r in rs) for rs in by_slot.values()]
            out.append({
                "seconds": seconds, "run_tasks": timed.seconds, "tasks": sum(busy), "critical": max(busy),
                "by_slot": by_slot, "bytes": getattr(timed.inner, "bytes_last_iteration", 0),
            })
    finally:
        timed.close()
    return out


# ------------------------------------------------------------------ results


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, no GPU"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def header(title: str, budget: str) -> dict[str, Any]:
    return {
        "title": title,
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
        "machine": machine(),
        "date": _dt.date.today().isoformat(),
        "torch": torch.__version__,
        "budget": budget,
    }


def experiment_dir(experiment: str) -> Path:
    """benchmarks/results/EXPERIMENT/ (created)."""
    path = RESULTS / experiment
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_results(name: str, meta: dict[str, Any], rows: list[dict[str, Any]], notes: Iterable[str] = (),
                  experiment: str | None = None) -> None:
    """benchmarks/results/EXPERIMENT/NAME.json (a list of rows; run info in NAME.meta.json)
    and NAME.md; EXPERIMENT defaults to NAME."""
    folder = experiment_dir(experiment or name)
    (folder / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (folder / f"{name}.meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols and not isinstance(r[k], (dict, list)))
    lines = [f"# {meta['title']}", ""]
    lines += [f"- command: `{meta['command']}`", f"- machine: {meta['machine']}", f"- date: {meta['date']}", f"- budget: {meta['budget']}", ""]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    notes = list(notes)
    if notes:
        lines += ["", *notes]
    (folder / f"{name}.md").write_text("\n".join(lines) + "\n")


def summarize(rows: list[dict[str, Any]], by: tuple[str, ...] = ("dataset", "method")) -> list[dict[str, Any]]:
    """Mean and spread (max - min) of the metrics over seeds, one row per group."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    out = []
    for key, rs in groups.items():
        row = dict(zip(by, key))
        row["seeds"] = len(rs)
        for m in METRICS:
            vals = [r[m] for r in rs]
            row[m] = statistics.fmean(vals)
            row[f"{m} spread"] = max(vals) - min(vals)
        out.append(row)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.5f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)
