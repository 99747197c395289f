"""Run directory safety: resume refuses before writing anything,
a finished run without step checkpoints is not retrained, the directory is locked,
a failed early run does not block its retry, stale temp entries are cleaned."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from metarec.cli import cli
from metarec.errors import NonFiniteError
from metarec.train import Trainer

MAX_STEPS = 8


def write_config(path: Path, root: str, **train_options) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "rundir",
        "seed": 1,
        "data": {"root": root, "target": "target", "max_len": 6},
        "model": {"hidden": 16, "blocks": 1},
        "train": {"batch_size": 8, "device": "cpu", "progress": False, "max_steps": MAX_STEPS, "eval_every": 2,
                  "patience": 100, **train_options},
        "vq": {"heads": 2},
    }))
    return path


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture
def finished(tiny_domains, tmp_path) -> tuple[Path, Path]:
    """(config, run dir) of a finished target-only run with step checkpoints every 4 steps."""
    config = write_config(tmp_path / "c.yaml", tiny_domains, checkpoint_every=4)
    run = tmp_path / "run"
    result = invoke("train", str(config), "--out", str(run))
    assert result.exit_code == 0, result.output
    return config, run


# ------------------------------------------------------------------ 1: changed config on resume


@pytest.mark.parametrize("override, key", [("model.hidden=32", "model.hidden"), ("train.lr=0.5", "train.lr")])
def test_resume_with_a_changed_config_refuses_before_writing_anything(finished, override, key):
    config, run = finished
    before = snapshot(run)
    result = invoke("train", str(config), "--out", str(run), "--resume", "--set", override)
    assert result.exit_code == 2
    assert f"cannot resume with a changed config ({key}:" in result.output
    assert "train.max_steps" in result.output  # says which keys may change
    assert snapshot(run) == before  # config.yaml included: the run can still be evaluated
    assert invoke("evaluate", str(run)).exit_code == 0


def test_resume_applies_and_records_an_allowed_change(finished):
    config, run = finished
    result = invoke("train", str(config), "--out", str(run), "--resume", "--set", f"train.max_steps={MAX_STEPS + 4}")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == MAX_STEPS + 4
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == list(range(1, MAX_STEPS + 5))
    assert json.loads((run / "metrics.json").read_text())["steps"] == MAX_STEPS + 4


# ------------------------------------------------------------------ 2: nothing to resume


def test_resume_of_a_finished_run_without_step_checkpoints_refuses(tiny_domains, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_domains)  # checkpoint_every: 0
    run = tmp_path / "run"
    assert invoke("train", str(config), "--out", str(run)).exit_code == 0
    before = snapshot(run)
    result = invoke("train", str(config), "--out", str(run), "--resume")
    assert result.exit_code == 2
    assert "has finished and kept no step checkpoint" in result.output
    assert snapshot(run) == before  # best/ and history.jsonl untouched


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_resume_of_an_empty_or_missing_directory_says_nothing_was_there(tiny_domains, tmp_path, make):
    config = write_config(tmp_path / "c.yaml", tiny_domains)
    run = tmp_path / "run"
    if make == "empty":
        run.mkdir()
    result = invoke("train", str(config), "--out", str(run), "--resume")
    assert result.exit_code == 2
    assert "nothing to resume" in result.output
    assert (run.exists(), list(run.iterdir()) if run.exists() else []) == ((make == "empty"), [])


# ------------------------------------------------------------------ 3: lock


def metarec_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "metarec.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def wait_for(predicate, what: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) before {what}: {proc.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, f"not {what} within {timeout} s"
        time.sleep(0.02)


def test_a_second_train_on_the_same_run_dir_refuses_at_once(tiny_domains, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_domains, max_steps=100000)
    run = tmp_path / "run"
    first = metarec_cli("train", str(config), "--out", str(run))
    try:
        lock = run / ".lock"
        wait_for(lambda: lock.exists() and lock.read_text().strip() == str(first.pid), "holding the lock", proc=first)
        first.send_signal(signal.SIGSTOP)  # holds the lock, whatever it is doing; no race with its progress
        second = metarec_cli("train", str(config), "--out", str(run))
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert f"run directory is in use by another metarec process (pid {first.pid})" in err
        assert "Traceback" not in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    from metarec.run_dir import RunLockedError, run_lock

    run = tmp_path / "run"
    run.mkdir()
    code = f"from metarec.run_dir import run_lock\nwith run_lock({str(run)!r}):\n    print('locked', flush=True)\n    input()"
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            with run_lock(str(run)):
                pass
    finally:
        holder.kill()
        holder.communicate(timeout=60)
    assert (run / ".lock").read_text().strip() == str(holder.pid)  # stale: its process is dead
    with run_lock(str(run)):
        assert (run / ".lock").read_text().strip() == str(os.getpid())
    assert not (run / ".lock").exists()


def test_an_exit_that_skips_the_lock_cleanup_can_release_the_held_locks(tmp_path):
    """metarec.ray.raylet_watch ends the process with os._exit: it removes the lock files first."""
    from metarec.run_dir import release_held_locks, run_lock

    run, other = tmp_path / "run", tmp_path / "other"
    run.mkdir()
    other.mkdir()
    (other / ".lock").write_text("123\n")  # not held by this process: left alone
    with run_lock(str(run)):
        release_held_locks()
        assert not (run / ".lock").exists() and (other / ".lock").exists()
    release_held_locks()  # none held any more: a no-op
    assert (other / ".lock").exists()


# ------------------------------------------------------------------ 4: a failed early run


def test_a_run_that_failed_before_its_first_evaluation_can_be_retried(tiny_domains, tmp_path, monkeypatch):
    config = write_config(tmp_path / "c.yaml", tiny_domains)
    run = tmp_path / "run"

    def nan_at_step_1(self, step):
        raise NonFiniteError(f"iteration {step}: loss is nan")

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "step", nan_at_step_1)
        failed = invoke("train", str(config), "--out", str(run))
    assert failed.exit_code == 2 and "loss is nan" in failed.output
    retry = invoke("train", str(config), "--out", str(run))
    assert retry.exit_code == 0, retry.output
    assert (run / "metrics.json").is_file()
    again = invoke("train", str(config), "--out", str(run))  # a started run is still protected
    assert again.exit_code == 2 and "already holds a run" in again.output


# ------------------------------------------------------------------ 5: stale temp entries


def test_stale_temp_entries_of_a_killed_write_are_removed_on_resume(finished):
    config, run = finished
    stale = [run / "checkpoints" / f".step-00000004.tmp-{'a' * 32}", run / "checkpoints" / f".best.old-{'b' * 32}",
             run / f".history.jsonl.tmp-{'c' * 32}"]
    for path in stale[:2]:
        path.mkdir()
        (path / "tensors.safetensors").write_bytes(b"torn")
    stale[2].write_text("torn")
    (run / "metrics.json").unlink()
    result = invoke("train", str(config), "--out", str(run), "--resume")
    assert result.exit_code == 0, result.output
    assert not [p for p in stale if p.exists()]
    assert "removed 3 stale temp entries" in result.output
