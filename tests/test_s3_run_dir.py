"""A run directory on S3 (a local moto server): train with step checkpoints, resume to
more steps, evaluate — and the resumed S3 run equals an uninterrupted local run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from metarec import fs

RUN = "s3://metarec-test/runs/tiny"


def metarec_cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the AWS_* variables of the moto_s3 fixture included
    return subprocess.Popen([sys.executable, "-m", "metarec.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out, err


@pytest.mark.slow
def test_train_resume_and_evaluate_on_s3(moto_s3, tiny_domains, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "s3",
        "seed": 2,
        "data": {"root": tiny_domains, "target": "target", "sources": ["src-a", "src-b"], "max_len": 6},
        "model": {"hidden": 16, "blocks": 1},
        "train": {"batch_size": 8, "device": "cpu", "progress": False, "eval_every": 2, "patience": 100,
                  "checkpoint_every": 2, "keep_checkpoints": 2},
        "vq": {"heads": 2},
        "meta": {"tasks_per_iter": 3},
    }))
    local = tmp_path / "local"
    uninterrupted = metarec_cli("train", str(config), "--out", str(local), "--set", "train.max_steps=8")
    finish(metarec_cli("train", str(config), "--out", RUN, "--set", "train.max_steps=4"))
    assert fs.listdir(f"{RUN}/checkpoints") == ["best", "step-00000002", "step-00000004"]
    assert json.loads(fs.read_bytes(f"{RUN}/metrics.json"))["steps"] == 4

    _, err = finish(metarec_cli("train", str(config), "--out", RUN, "--resume", "--set", "train.max_steps=8"))
    assert f"resumed {RUN} at step 4" in err
    assert fs.listdir(f"{RUN}/checkpoints") == ["best", "step-00000006", "step-00000008"]  # pruned to keep 2
    history = [json.loads(line) for line in fs.read_text(f"{RUN}/history.jsonl").splitlines()]
    assert [r["step"] for r in history] == list(range(1, 9))
    metrics = json.loads(fs.read_bytes(f"{RUN}/metrics.json"))
    assert metrics["steps"] == 8

    finish(uninterrupted)
    want = json.loads((local / "metrics.json").read_text())
    assert (metrics["best_step"], metrics["val"], metrics["test"]) == (want["best_step"], want["val"], want["test"])

    out, _ = finish(metarec_cli("evaluate", RUN))
    assert json.loads(out) == metrics["test"]
