"""A driver that uses a local Ray instance ends cleanly on SIGTERM (exit 143, without Ray's
crash trace), and what a SIGKILLed one leaves of its Ray instance is reaped by the next run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_output import driver_lines
from test_bad_inputs_2 import config

HANG_GUARD_S = 600


def kill_if_running(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=60)


def start_train_on_ray(cfg: Path, mode: str, run: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    """`metarec train CFG MODE` on both test sources, once its first step checkpoint is written."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "metarec.cli", "train", str(cfg), mode, "--out", str(run),
                                 "--set", "data.sources=[src-a, src-b]", "--set", "ray.num_workers=2"],
                                stdout=subprocess.DEVNULL, stderr=err, env=env)
    deadline = time.monotonic() + HANG_GUARD_S  # only catches a hung start; the test waits for a state
    while not any((run / "checkpoints").glob("step-*")):
        if proc.poll() is not None or time.monotonic() >= deadline:
            kill_if_running(proc)
            raise AssertionError(f"no step checkpoint (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["--ray", "--ray-train"])
def test_sigterm_exits_143_cleanly(tmp_path, tiny_domains, mode):
    run, log = tmp_path / "run", tmp_path / "stderr.txt"
    cfg = config(tmp_path, tiny_domains, max_steps=100_000, eval_every=100_000, checkpoint_every=1)
    proc = start_train_on_ray(cfg, mode, run, log, dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        if mode == "--ray-train":  # the rendezvous and scratch folder is a hidden temp entry of the run directory
            assert [p.name.split(".tmp-")[0] for p in run.glob(".ray-train-scratch.tmp-*")] == [".ray-train-scratch"]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=HANG_GUARD_S)
    finally:
        kill_if_running(proc)
    text = log.read_text()
    assert proc.returncode == 143, text[-3000:]
    assert "SIGTERM received" not in text and "Traceback (most recent call last)" not in "\n".join(driver_lines(text)), text[-3000:]
    assert not (run / ".lock").exists() and not list(run.glob(".ray-train-scratch*"))


def _alive(pid: int, start: str | None) -> bool:
    from metarec.ray.sessions import _start_time

    return start is not None and _start_time(pid) == start


@pytest.mark.ray
@pytest.mark.slow
def test_the_next_run_reaps_the_ray_instance_of_a_killed_driver(tmp_path, tiny_domains):
    import json

    from metarec.ray import sessions as ray_sessions

    log = tmp_path / "stderr.txt"
    cfg = config(tmp_path, tiny_domains, max_steps=100_000, eval_every=100_000, checkpoint_every=1)
    args = [sys.executable, "-m", "metarec.cli", "train", str(cfg), "--ray", "--set", "data.sources=[src-a, src-b]"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "w") as err:
        killed = subprocess.Popen([*args, "--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL, stderr=err, env=env)
    record = Path(ray_sessions._registry()) / f"{killed.pid}.json"
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not (record.exists() and any((tmp_path / "killed" / "checkpoints").glob("step-*"))):
            assert killed.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not start in time"
            time.sleep(0.2)
        session = json.loads(record.read_text())["session"]
        procs = ray_sessions._session_pids(session)
        assert procs  # its GCS, raylet, agents and workers
    finally:
        killed.kill()  # SIGKILL: nothing of the driver runs, Ray's processes are orphaned
        killed.wait(timeout=60)
    folder = Path(ray_sessions.ray_temp_dir()) / session
    assert folder.is_dir()

    nxt = subprocess.run([*args, "--out", str(tmp_path / "next"), "--set", "train.max_steps=2", "--set", "train.eval_every=2"],
                         capture_output=True, text=True, timeout=HANG_GUARD_S, env=env)
    assert nxt.returncode == 0, nxt.stderr[-3000:]
    assert any(line.startswith("reaped ") and "left by a killed metarec driver" in line and session in line
               for line in nxt.stderr.splitlines()), nxt.stderr[-3000:]
    assert not [pid for pid, start in procs if _alive(pid, start)]
    assert not folder.exists() and not record.exists()
    assert not (Path(ray_sessions._registry()) / f"{os.getpid()}.json").exists()


def _main_thread_cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def wait_until_blocked(pid: int, quiet_s: float = 2.0) -> None:
    """Until the main thread of `pid` has used no CPU for `quiet_s`: with its Ray workers
    stopped, the driver ends up waiting for their results and stays there."""
    deadline = time.monotonic() + HANG_GUARD_S
    ticks, since = _main_thread_cpu_ticks(pid), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, "the driver never blocked on its stopped workers"
        time.sleep(0.1)
        now = _main_thread_cpu_ticks(pid)
        if now != ticks:
            ticks, since = now, time.monotonic()


@pytest.mark.ray
@pytest.mark.slow
def test_sigkill_of_the_raylet_stops_the_run_with_one_line_and_exit_2(tmp_path, tiny_domains):
    """Without metarec.ray.raylet_watch, Ray's core worker ended the driver
    with `_exit(1)` at its next object-store access: a log dump, no `error:` line, `.lock` left.

    The raylet dies while the driver waits for its workers' results (where a driver spends
    its time): the workers are stopped first, so the kill cannot land inside one of the
    driver's object-store calls, the window the module docstring documents (exit 1 there)."""
    import shutil
    import tempfile

    from test_ray_local import alive, process_tree

    run, log = tmp_path / "run", tmp_path / "stderr.txt"
    cfg = config(tmp_path, tiny_domains, max_steps=100_000, eval_every=100_000, checkpoint_every=1)
    ray_tmp = tempfile.mkdtemp(prefix="metarec-raylet-")  # short: Ray's socket paths must stay under 108 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=ray_tmp, HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    stopped: list[int] = []
    try:
        proc = start_train_on_ray(cfg, "--ray", run, log, env)
        try:
            instance = process_tree(proc.pid)
            instance.pop(proc.pid)
            names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] for pid in instance}
            raylets = [pid for pid, name in names.items() if name.endswith(b"raylet")]
            assert len(raylets) == 1, instance
            for pid, name in names.items():
                if name.startswith(b"ray::"):  # the workers, actors and idle ones
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
            assert stopped, names
            wait_until_blocked(proc.pid)
            os.kill(raylets[0], signal.SIGKILL)
            proc.wait(timeout=HANG_GUARD_S)
        finally:
            kill_if_running(proc)
            for pid in stopped:  # they exit on their own once they run and find their raylet gone
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        text = log.read_text()
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2, text[-3000:]
        assert len(errors) == 1 and f"local Ray instance (pid {raylets[0]}) died" in errors[0], text[-3000:]
        assert "--resume" in errors[0] and "Traceback (most recent call last)" not in "\n".join(driver_lines(text)), text[-3000:]
        assert not (run / ".lock").exists()
        deadline = time.monotonic() + 60  # the instance's GCS and agents (SIGTERM), its workers (on their own)
        while alive(instance) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(instance), f"processes of the Ray instance still running: {alive(instance)}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("pidfd", [True, False])
def test_the_raylet_watch_wakes_when_its_process_exits_and_when_stopped(monkeypatch, pidfd):
    """metarec.ray.raylet_watch's wait, on a stand-in process: True when it exits (also with
    no pidfd: polling), False when stop() writes to its pipe."""
    import threading

    from metarec.ray import raylet_watch, sessions

    if not pidfd:
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    for stop in (False, True):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        wake_read, wake_write = os.pipe()
        got, start = [], sessions._start_time(child.pid)
        waiter = threading.Thread(target=lambda: got.append(raylet_watch._wait_for_exit(child.pid, start, wake_read)))
        waiter.start()
        try:
            if stop:
                os.write(wake_write, b"x")
            else:
                child.kill()
            waiter.join(timeout=60)
            assert got == [not stop]
        finally:
            child.kill()
            child.wait(timeout=60)
            os.close(wake_read)
            os.close(wake_write)
