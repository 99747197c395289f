"""`metarec demo`: the built-in job that needs no downloads.

Generates a seeded synthetic multi-domain problem (two large sources and one small
target with disjoint item sets that share a planted transition structure, see
`metarec.data.synthetic`), trains target-only LRURec and MetaRec on it with the same
budget, and prints their test metrics side by side with the NDCG@10 difference and its
95% paired bootstrap interval over the test users (`metarec.compare`).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from metarec import fs
from metarec.compare import METRIC, compare_runs, format_comparison
from metarec.config import config_from_dict
from metarec.data.synthetic import generate_domains
from metarec.launch import run

SOURCES = ["synthetic-source-a", "synthetic-source-b"]
METHODS = ("target_only", "metarec")
TARGET = "synthetic-target"


def demo_config(root: str, method: str, quick: bool, seed: int = 0) -> dict[str, Any]:
    """The data, a model and budget sized for a demo (both methods the same, one learning rate),
    and every transfer setting at its default: what a config naming only the data trains."""
    steps = 200 if quick else 300
    return {
        "name": f"demo_{method}",
        "seed": seed,
        "data": {"root": root, "target": TARGET, "sources": SOURCES if method == "metarec" else [], "max_len": 20},
        "model": {"backbone": "lru", "hidden": 32, "blocks": 1},
        "train": {"batch_size": 64, "lr": 2e-3, "max_steps": steps, "eval_every": steps // 6, "patience": 3, "eval_batch_size": 512},
        "meta": {"tasks_per_iter": 2},
    }


def run_demo(out_dir: str, quick: bool = False, seed: int = 0, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Train both methods under `out_dir`; returns {method: test metrics, "comparison": the NDCG@10
    difference with its interval}, both from `metarec.compare.compare_runs` (`metarec compare`)."""
    out_dir = out_dir.rstrip("/")
    root = f"{out_dir}/data"
    if not fs.exists(f"{root}/{TARGET}/manifest.json"):
        generate_domains(root, names=(*SOURCES, TARGET), seed=seed)
    for method in METHODS:
        raw = demo_config(root, method, quick, seed)
        raw["train"]["progress"] = progress
        cfg = config_from_dict(raw, "demo config")
        run(cfg, f"{out_dir}/{method}", "local", refuse_existing=False)
        _plot(f"{out_dir}/{method}")
    result = compare_runs([f"{out_dir}/{method}" for method in METHODS], seed=seed)  # what `metarec compare` prints
    table: dict[str, dict[str, Any]] = {method: row["metrics"] for method, row in zip(METHODS, result["runs"])}
    table["comparison"] = result["differences"][0][METRIC]
    fs.atomic_write_bytes(f"{out_dir}/demo.json", json.dumps(table, indent=1).encode())
    return table


def _plot(run_dir: str) -> None:
    """Training curves (and the source-weight heatmap) when the `plot` extra is installed."""
    from metarec.errors import MetaRecError
    from metarec.plots import plot_run

    try:
        plot_run(run_dir)
    except MetaRecError as err:  # matplotlib missing: the table is the demo's result
        print(f"note: no plots ({err})", file=sys.stderr)


def format_table(table: dict[str, dict[str, Any]]) -> str:
    keys = ["NDCG@10", "Recall@10", "MRR"]
    lines = [f"{'method':<14}" + "".join(f"{k:>12}" for k in keys)]
    for method in METHODS:
        lines.append(f"{method:<14}" + "".join(f"{table[method][k]:>12.4f}" for k in keys))
    lines.append(format_comparison(table["comparison"], "MetaRec vs target-only"))
    return "\n".join(lines)
