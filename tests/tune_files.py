"""The files the `metarec tune` tests share: tiny synthetic domains, a base config and a
4-trial space (tests/test_tune_space.py, tests/test_tune_sweep.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from conftest import make_tiny_domains

MAX_STEPS, EVAL_EVERY = 40, 5
N_EVALS = MAX_STEPS // EVAL_EVERY
N_TRIALS = 4
METAREC = [sys.executable, "-m", "metarec.cli"]


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def base_config(root: str) -> dict:
    return {
        "name": "tiny",
        "data": {"root": root, "target": "target", "sources": ["src-a", "src-b"], "max_len": 8},
        "model": {"hidden": 16, "blocks": 1},
        "train": {"batch_size": 16, "max_steps": MAX_STEPS, "eval_every": EVAL_EVERY, "patience": 100, "device": "cpu", "progress": False},
        "meta": {"tasks_per_iter": 2},
    }


def space_dict(base: str, **changes) -> dict:
    space = {
        "name": "tiny_sweep",
        "base_config": base,
        "num_samples": N_TRIALS,
        "max_concurrent_trials": 1,
        "scheduler": {"grace_period": 1, "reduction_factor": 2},
        "max_failures": 1,
        "params": {
            "rescale.tau": {"loguniform": [0.05, 5.0]},
            "vq.heads": {"choice": [1, 2, 4]},
            "meta.inner_lr": {"loguniform": ["1e-3", "1e-1"]},
            "train.lr": {"loguniform": [3.0e-4, 3.0e-2]},
        },
    }
    space.update(changes)
    return space


def make_files(tmp: Path) -> dict[str, str]:
    """Prepared domains, base.yaml and space.yaml in `tmp`; their paths and a sweep store."""
    root = make_tiny_domains(tmp / "prepared")
    base = write_yaml(tmp / "base.yaml", base_config(str(root)))
    return {"tmp": str(tmp), "base": base, "space": write_yaml(tmp / "space.yaml", space_dict("base.yaml")), "store": str(tmp / "store")}
