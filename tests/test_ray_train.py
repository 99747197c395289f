"""Baselines on Ray Train: one worker = the local run; a killed worker is
restored from the last checkpoint; bad `--workers` is one line, exit status 2."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch
from click.testing import CliRunner

from metarec.checkpoint import load_checkpoint
from metarec.cli import cli
from metarec.config import config_from_dict
from metarec.train import train
from ray_output import driver_lines

STEPS = 4



@pytest.fixture(scope="module")
def root(tiny_domains_module) -> str:
    return tiny_domains_module


def baseline_config(root: str, sources=(), **ray_options) -> dict:
    return {
        "seed": 5,
        "data": {"root": root, "target": "target", "sources": list(sources), "max_len": 6},
        "model": {"hidden": 16, "blocks": 1},
        "train": {"batch_size": 8, "device": "cpu", "progress": False, "max_steps": STEPS, "eval_every": 2, "checkpoint_every": 2},
        "vq": {"heads": 2},
        "meta": {"enabled": False, "tasks_per_iter": 2},
        "ray": {"cpus_per_worker": 0.5, **ray_options},
    }


def params_at(out: str, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_checkpoint(f"{out}/checkpoints/step-{step:08d}").params


def metrics_of(out: str) -> dict:
    with open(f"{out}/metrics.json") as f:
        return json.load(f)


@pytest.mark.ray
@pytest.mark.slow
def test_one_worker_equals_the_local_run(private_ray, root, tmp_path):
    from metarec.ray.ray_train import fit_with_ray_train

    cfg = config_from_dict(baseline_config(root, num_workers=1))
    assert cfg.method == "target_only"
    train(cfg, str(tmp_path / "local"))
    fit_with_ray_train(cfg, str(tmp_path / "ray"), local=True)
    want, got = params_at(str(tmp_path / "local")), params_at(str(tmp_path / "ray"))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    local, ray_train = metrics_of(str(tmp_path / "local")), metrics_of(str(tmp_path / "ray"))
    assert ray_train["test"] == local["test"] and ray_train["best_step"] == local["best_step"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_worker_is_restored_from_the_last_checkpoint(private_ray, root, tmp_path, monkeypatch):
    """Joint training on 2 data-parallel workers; worker 1 dies in step 3 (index 2), after
    the step-2 checkpoint: Ray Train restarts the group from it and the run finishes."""
    from metarec.ray.ray_train import KILL_ENV, fit_with_ray_train, kill_marker

    monkeypatch.setenv(KILL_ENV, "2:1")
    scratch_parent = tmp_path / "tmp"
    scratch_parent.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_parent))  # where the driver makes its scratch folder
    raw = baseline_config(root, sources=["src-a", "src-b"], num_workers=2)
    raw["train"]["checkpoint_every"] = 1
    cfg = config_from_dict(raw)
    assert cfg.method == "joint"
    metrics = fit_with_ray_train(cfg, str(tmp_path / "run"), local=True)
    assert metrics["steps"] == STEPS
    assert list(scratch_parent.iterdir()) == []  # the killed worker's scratch run and the rendezvous file are gone
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # (kept in the run directory)
    assert (tmp_path / "run" / "ray_train" / "killed-2-1").exists() and kill_marker(str(tmp_path / "run"), 2, 1)
    with open(tmp_path / "run" / "history.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["bytes_per_worker"] > 0 for r in rows)  # the gradients were averaged over 2 workers


def write_config(tmp_path, root) -> str:
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(baseline_config(root)))
    return str(path)


def test_workers_zero_is_one_line_exit_2(root, tmp_path):
    result = CliRunner().invoke(cli, ["train", write_config(tmp_path, root), "--ray-train", "--workers", "0",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --workers 0: the number of Ray workers must be at least 1"
    assert not (tmp_path / "run").exists()


@pytest.mark.ray
def test_more_workers_than_ray_can_place_is_one_line_exit_2(private_ray, root, tmp_path):
    import ray

    cpus = ray.cluster_resources()["CPU"]
    result = CliRunner().invoke(cli, ["train", write_config(tmp_path, root), "--ray-train", "--workers", "64",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    lines = driver_lines(result.output.strip())  # an earlier test's Ray Train actors may print meanwhile
    assert len(lines) == 1 and lines[0].startswith("error: ray.num_workers=64 x ray.cpus_per_worker=0.5 = 32 CPUs cannot be placed")
    assert f"has {cpus:g} CPUs" in lines[0] and "this machine's local Ray" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_collective_cli_run_listens_on_loopback_only_and_leaves_no_process(root, tmp_path):
    """`metarec train --ray --set ray.mode=collective` in its own process: once worker 0 has
    written a step checkpoint (the gloo group is up), every listening socket of the run's
    processes (driver, Ray, Ray Train controller and workers) is on loopback; after SIGTERM
    no process of the run is left."""
    import ipaddress
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import yaml
    from test_ray_local import alive, listening_sockets, process_tree

    from conftest import RAY_TRAIN_TEST_ENV

    cfg = baseline_config(root, sources=["src-a", "src-b"], mode="collective", num_workers=2)
    cfg["meta"]["enabled"] = True
    cfg["train"].update(max_steps=100_000, eval_every=100_000, checkpoint_every=1)  # runs until stopped
    config = tmp_path / "collective.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TRAIN_TEST_ENV, HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "metarec.cli", "train", str(config), "--out", str(run), "--ray"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # generous: a saturated machine starts Ray Train workers slowly
        while not (run / "checkpoints" / "step-00000001" / "state.json").exists():
            if proc.poll() is not None:
                pytest.fail(f"train exited {proc.returncode} early: {proc.communicate()[1][-3000:]}")
            assert time.monotonic() < deadline, "no step checkpoint within 600 s"
            time.sleep(0.05)
        processes = process_tree(proc.pid)
        sockets = listening_sockets(processes)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)
    assert any("RayTrainWorker" in c for *_, c in sockets), sockets  # gloo's listeners were listed
    exposed = [s for s in sockets if not ipaddress.ip_address(s[1]).is_loopback]
    assert not exposed, f"listening on a non-loopback address: {exposed}"
    deadline = time.monotonic() + 60
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(processes), f"processes of the run still running: {alive(processes)}"
