"""End to end: a token-authenticated Ray head on 127.0.0.1, `ray job submit` of
`metarec train ... --ray-address auto`, and a submit without the token is rejected.

The head is started with `ray start --block` in its own session and temp dir, and
stopped by signalling exactly the processes of that session (never `ray stop`,
which would stop every Ray instance of this user, other tests' included).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
JOB_TIMEOUT_S = 180
MAX_STEPS = 4

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of the live processes, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        table[int(entry)] = (int(ppid), state, cmdline)
    return table


def session_processes(head_pid: int, temp_dir: str) -> set[int]:
    """`ray start --block`, every process started for `temp_dir`, and their descendants."""
    table = _process_table()
    found = {pid for pid, (_, state, cmd) in table.items() if state != "Z" and (pid == head_pid or temp_dir in cmd)}
    while True:
        children = {pid for pid, (ppid, state, _) in table.items() if ppid in found and state != "Z"} - found
        if not children:
            break
        found |= children
    found.discard(os.getpid())
    return found


def signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM the session's processes; after 5 s, SIGKILL whatever is left (again, for late children)."""
    signal_all(session_processes(head.pid, temp_dir), signal.SIGTERM)
    deadline = time.monotonic() + 20
    while (left := session_processes(head.pid, temp_dir)) and time.monotonic() < deadline:
        if time.monotonic() > deadline - 15:
            signal_all(left, signal.SIGKILL)
        head.poll()  # reap the head once it exits
        time.sleep(0.5)
    assert not left, f"Ray processes still alive after 20 s: {sorted(left)}"
    head.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster():
    """A head bound to 127.0.0.1 with token auth; yields (dashboard URL, env with the token, env without)."""
    temp_dir = tempfile.mkdtemp(prefix="mrray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    home = Path(temp_dir) / "home"
    home.mkdir()
    token_path = Path(temp_dir) / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")
    with_token = dict(base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    gcs, dashboard, client, node_manager, object_manager, agent_http, agent_grpc, metrics, runtime_env = free_ports(9)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--port={gcs}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
         "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}/ray"],
        env=with_token, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while ray_cli("job", "list", "--address", url, env=with_token, timeout=60).returncode != 0:
            assert head.poll() is None, f"ray start exited: {head.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "the Ray head did not come up within 120 s"
            time.sleep(1)
        yield url, with_token, base
    finally:
        stop_head(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_trains_with_token_auth(cluster, tiny_domains, tmp_path):
    url, with_token, without_token = cluster
    job_dir = tmp_path / "job"  # the working dir: just the config (metarec is installed in the venv)
    job_dir.mkdir()
    (job_dir / "tiny.yaml").write_text(yaml.safe_dump({
        "name": "e2e",
        "data": {"root": str(Path(tiny_domains).resolve()), "target": "target", "sources": ["src-a", "src-b"], "max_len": 6},
        "model": {"hidden": 16, "blocks": 1},
        "train": {"batch_size": 8, "device": "cpu", "progress": False, "max_steps": MAX_STEPS, "eval_every": 2},
        "vq": {"heads": 2},
        "meta": {"tasks_per_iter": 3},
        "ray": {"num_workers": 2},
    }))
    out = tmp_path / "run"
    entrypoint = ["metarec", "train", "tiny.yaml", "--ray-address", "auto", "--out", str(out)]

    for env in (without_token, dict(without_token, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))):
        denied = ray_cli("job", "submit", "--address", url, "--no-wait", "--working-dir", str(job_dir), "--", *entrypoint, env=env)
        assert denied.returncode != 0
        assert "Token authentication is enabled but" in denied.stdout + denied.stderr, denied.stderr[-2000:]

    job_id = f"metarec-e2e-{secrets.token_hex(4)}"
    submitted = ray_cli("job", "submit", "--address", url, "--no-wait", "--submission-id", job_id,
                        "--working-dir", str(job_dir), "--", *entrypoint, env=with_token, timeout=120)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    state = None
    while state is None and time.monotonic() < deadline:
        shown = ray_cli("job", "status", "--address", url, job_id, env=with_token)
        found = re.search(rf"Job '{job_id}' (succeeded|failed|stopped)", shown.stdout + shown.stderr)
        state = found.group(1) if found else None
        time.sleep(0 if state else 2)
    logs = ray_cli("job", "logs", "--address", url, job_id, env=with_token).stdout
    assert state == "succeeded", f"job state {state} after at most {JOB_TIMEOUT_S} s; logs:\n{logs[-4000:]}"
    assert "Connected to Ray cluster" in logs  # the job's driver joined this cluster (--ray-address auto)

    jobs = ray_cli("job", "list", "--address", url, env=with_token).stdout
    assert jobs.count("submission_id=") == 1  # the rejected submits created no job
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "metarec" and metrics["steps"] == MAX_STEPS
    assert 0.0 < metrics["test"]["NDCG@10"] <= 1.0
    assert json.loads(logs[logs.index("{"):])["run_dir"] == str(out)
