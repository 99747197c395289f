"""Shared plumbing of the benchmark scripts: data preparation, result files, machine info."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PREPARED = REPO / ".cache" / "prepared"
METRICS = ("NDCG@10", "Recall@10", "MRR")


def prepare_shared_data() -> str:
    """Prepare ../shared/data into .cache/prepared (idempotent); returns the root."""
    from metarec.data.prepare import prepare_shared

    prepare_shared(str(PREPARED))
    return str(PREPARED)


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


def write_results(name: str, meta: dict[str, Any], rows: list[dict[str, Any]], notes: Iterable[str] = ()) -> None:
    """benchmarks/results/NAME.json (a list of rows; run info in NAME.meta.json) and NAME.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / f"{name}.meta.json").write_text(json.dumps(meta, indent=1) + "\n")
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
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


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
