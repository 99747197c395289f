"""The sweep's search algorithm honours the space's `max_concurrent_trials` (no Ray started)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metarec.data.synthetic import generate_domains
from tune.space import load_space
from tune.sweep import search_algorithm


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tune_search")
    root = generate_domains(tmp / "prepared", names=("target",), n_users={"target": 20}, n_items={"target": 16},
                            seq_len={"target": 5}, n_concepts=4, seed=0)
    path = tmp / "base.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "data": {"root": str(root), "target": "target"},
                                    "model": {"hidden": 8, "blocks": 1}, "train": {"max_steps": 4, "eval_every": 2}}))
    return path


@pytest.mark.parametrize("limit, expected", [(1, 1), (3, 3), (None, 0)])  # 0: Tune's "no limit"
def test_max_concurrent_trials_reaches_the_search_algorithm(base, tmp_path, limit, expected):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({"name": "s", "base_config": str(base), "num_samples": 4, "max_concurrent_trials": limit,
                                          "params": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}))
    assert search_algorithm(load_space(str(space_file))).max_concurrent == expected
