"""Checkpoint/resume (docs/design.md §6): a SIGKILLed run resumed with --resume ends exactly where
an uninterrupted run ends; torn checkpoints are skipped with a warning. Local runner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from metarec.run_dir import step_checkpoints
from metarec.config import load_config
from metarec.train import train

MAX_STEPS = 12


def write_config(path: Path, root: str, **train_options) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "resume",
        "seed": 5,
        "data": {"root": root, "target": "target", "sources": ["src-a", "src-b"], "max_len": 6},
        "model": {"hidden": 16, "blocks": 1},
        "train": {"batch_size": 8, "device": "cpu", "progress": False, "max_steps": MAX_STEPS, "eval_every": 2,
                  "patience": 100, **train_options},
        "vq": {"heads": 2},
        "meta": {"tasks_per_iter": 3},
    }))
    return path


def metarec_cli(*args: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # same numerics in every run of the comparison
    return subprocess.Popen([sys.executable, "-m", "metarec.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = metarec_cli(*args)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def best_params(run: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(run / "checkpoints/best/tensors.safetensors").items() if k.startswith("param/")}


def assert_same_run(got: Path, want: Path) -> None:
    a, b = best_params(got), best_params(want)
    assert a.keys() == b.keys()
    for name in b:
        assert torch.equal(a[name], b[name]), name
    mg, mw = (json.loads((r / "metrics.json").read_text()) for r in (got, want))
    assert (mg["best_step"], mg["steps"], mg["test"], mg["val"]) == (mw["best_step"], mw["steps"], mw["test"], mw["val"])
    val_curve = [[r["step"], r.get("val")] for r in map(json.loads, (want / "history.jsonl").read_text().splitlines())]
    assert [[r["step"], r.get("val")] for r in map(json.loads, (got / "history.jsonl").read_text().splitlines())] == val_curve


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_result(tiny_domains, tmp_path):
    config = write_config(tmp_path / "tiny.yaml", tiny_domains)
    ckpt_every = ["--set", "train.checkpoint_every=2"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    uninterrupted = metarec_cli("train", str(config), "--out", str(whole), *ckpt_every)
    victim = metarec_cli("train", str(config), "--out", str(killed), *ckpt_every)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints/step-00000002/state.json").exists():
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no step checkpoint within 120 s"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()
    steps = [s for s, _ in step_checkpoints(str(killed / "checkpoints"))]
    assert steps and steps[-1] < MAX_STEPS

    _, err = uninterrupted.communicate(timeout=120)
    assert uninterrupted.returncode == 0, err[-3000:]
    resumed = run_cli("train", str(config), "--out", str(killed), "--resume", *ckpt_every)
    assert f"resumed {killed} at step {steps[-1]}" in resumed.stderr
    assert_same_run(killed, whole)


def test_torn_checkpoints_are_skipped_with_a_warning(tiny_domains, tmp_path, capsys):
    cfg = load_config(write_config(tmp_path / "tiny.yaml", tiny_domains, checkpoint_every=4, keep_checkpoints=3))
    whole, torn = tmp_path / "whole", tmp_path / "torn"
    train(cfg, str(whole))
    train(cfg, str(torn))
    ckpts = torn / "checkpoints"
    assert [s for s, _ in step_checkpoints(str(ckpts))] == [4, 8, 12]
    tensors = ckpts / "step-00000012/tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])  # truncated write
    (ckpts / "step-00000008/state.json").unlink()  # state never written
    (torn / "metrics.json").unlink()

    capsys.readouterr()
    with pytest.warns(UserWarning, match="skipping torn checkpoint") as warned:
        train(cfg, str(torn), resume=True)
    assert f"resumed {torn} at step 4" in capsys.readouterr().err
    messages = [str(w.message) for w in warned if "torn" in str(w.message)]
    assert any("step-00000012" in m and "sha256 does not match" in m for m in messages)  # caught by its checksum
    assert any("step-00000008" in m and "no checkpoint here" in m for m in messages)
    history = [json.loads(line) for line in (torn / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == list(range(1, MAX_STEPS + 1))
    assert_same_run(torn, whole)


@pytest.mark.parametrize("sources", [[], ["src-a", "src-b"]], ids=["target_only", "metarec"])
def test_epoch_batch_order_resumes_to_the_uninterrupted_result(tiny_domains, tmp_path, sources):
    """`train.batch_order: epoch` draws target batches as a pure function of the step, so a
    run stopped at a checkpoint and resumed ends where the uninterrupted run ends."""
    cfg = load_config(str(write_config(tmp_path / "c.yaml", tiny_domains, batch_order="epoch", checkpoint_every=2)))
    cfg.data.sources = sources
    assert_resume_from_half_ends_the_same(cfg, tmp_path)


def assert_resume_from_half_ends_the_same(cfg, tmp_path: Path) -> None:
    """Train `cfg` whole, and to half its steps then resumed: the two runs must end the same."""
    train(cfg, str(tmp_path / "full"))
    half = cfg.model_copy(deep=True)
    half.train.max_steps = MAX_STEPS // 2
    train(half, str(tmp_path / "resumed"))
    train(cfg, str(tmp_path / "resumed"), resume=True)
    assert_same_run(tmp_path / "resumed", tmp_path / "full")


def test_smoothed_similarities_survive_a_resume(tiny_domains, tmp_path):
    """`rescale.smoothing` keeps per-source averages across iterations; they are in the step
    checkpoint, so a resumed run ends where the uninterrupted run ends."""
    cfg = load_config(str(write_config(tmp_path / "c.yaml", tiny_domains, checkpoint_every=2)))
    cfg.data.sources = ["src-a", "src-b"]
    cfg.meta.tasks_per_iter = 2
    cfg.rescale.smoothing, cfg.rescale.tau = 0.9, 0.01
    assert_resume_from_half_ends_the_same(cfg, tmp_path)
