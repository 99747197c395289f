"""The committed rows of the convergence protocol say what they ran (benchmarks/README.md).

Every row of benchmarks/results/{scientific,transfer_converge}/*.jsonl carries its metrics
and `config`, the full config it ran with, which validates today and agrees with the
row's name: target-only methods have `target_only` in their name, MetaRec methods start
with `metarec`, and the row's own fields (dataset, seed, users, sources) are its config's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metarec.config import config_from_dict

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
NOT_ROWS = {"official_lrurec.jsonl"}  # the official LRURec code's run: not a metarec config
FIELDS = ("dataset", "method", "seed", "NDCG@10", "Recall@10", "MRR", "val NDCG@10", "converged", "config")
ROW_FILES = sorted(
    p for folder in ("scientific", "transfer_converge") for p in (RESULTS / folder).glob("*.jsonl")
    if p.name not in NOT_ROWS and not p.name.endswith("_reruns.jsonl")
)


def test_the_issue_row_files_are_all_here():
    names = {f"{p.parent.name}/{p.name}" for p in ROW_FILES}
    assert {"scientific/scientific.jsonl", "scientific/refit_on_validation.jsonl",
            "transfer_converge/transfer_converge.jsonl", "transfer_converge/refit_on_validation.jsonl"} <= names


@pytest.mark.parametrize("path", ROW_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_row_records_a_config_that_matches_it(path):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert rows
    for row in rows:
        where = f"{path.name}: {row.get('method')} seed {row.get('seed')}"
        assert all(k in row for k in FIELDS), f"{where}: lacks {[k for k in FIELDS if k not in row]}"
        cfg = config_from_dict(row["config"], where)
        assert (cfg.data.target, cfg.seed, cfg.data.target_users) == (row["dataset"], row["seed"], row["target_users"]), where
        assert cfg.train.eval_every == row["eval_every"], where
        if "sources" in row:
            assert list(cfg.data.sources) == row["sources"], where
        assert (cfg.method == "target_only") == ("target_only" in row["method"]), where
        if cfg.method == "metarec":
            assert row["method"].startswith("metarec"), where
        if path.parent.name == "scientific" and cfg.data.sources:  # point 3's rows name their set
            assert row.get("source_set") in {"clean", "harmful", "noise"}, where
