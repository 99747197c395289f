"""`metarec train --ray` on a private local Ray instance: every
socket of the run listens on loopback only, no process of the run survives it, and
neither does its session folder under Ray's temp dir.

One real CLI run in its own process: the driver is stopped (SIGSTOP) once it has written a
step checkpoint, so its Ray processes are all up while the test lists them, whatever the
machine's load; it then finishes normally and every process seen must be gone.
Linux only (reads /proc); psutil is not a dependency.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")]


def _stat(pid: str) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(root: int) -> dict[int, str]:
    """{pid: start time} of `root` and all its descendants."""
    parent = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fields = _stat(pid)
        if fields:
            parent[int(pid)] = (int(fields[1]), fields[19])
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in parent.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return {pid: parent[pid][1] for pid in tree if pid in parent}


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))  # /proc prints 4 host-order words
    address = ipaddress.IPv6Address(words)
    return address.ipv4_mapped or address


def listening_sockets(pids) -> list[tuple[int, str, int, str]]:
    """(pid, address, port, command) of every TCP socket in LISTEN state held by `pids`."""
    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                host, port = fields[1].split(":")
                listening[fields[9]] = (_address(host), int(port, 16))
    found = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            command = " ".join([os.path.basename(argv[0]), *argv[1:]])[:80]
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in listening:
                    address, port = listening[target[8:-1]]
                    found.append((pid, str(address), port, command))
        except OSError:  # exited meanwhile
            continue
    return found


def alive(processes: dict[int, str]) -> dict[int, str]:
    """Those of `processes` still running (same pid and start time, not a zombie)."""
    left = {}
    for pid, start in processes.items():
        fields = _stat(str(pid))
        if fields and fields[19] == start and fields[0] != "Z":
            left[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:60]
    return left


def test_local_ray_run_listens_on_loopback_only_and_leaves_no_process(tiny_domains, tmp_path):
    config = tmp_path / "ray.yaml"
    config.write_text(yaml.safe_dump({
        "name": "ray-local",
        "seed": 0,
        "data": {"root": tiny_domains, "target": "target", "sources": ["src-a", "src-b"], "max_len": 6},
        "model": {"hidden": 16, "blocks": 1},
        "train": {"batch_size": 8, "device": "cpu", "progress": False, "max_steps": 4, "eval_every": 4,
                  "checkpoint_every": 1},
        "vq": {"heads": 2},
        "meta": {"tasks_per_iter": 2},
        "ray": {"num_workers": 1},
    }))
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    ray_tmp = Path(env.get("TMPDIR") or "/tmp") / "ray"  # Ray's temp dir (metarec.ray.sessions.ray_temp_dir)
    proc = subprocess.Popen([sys.executable, "-m", "metarec.cli", "train", str(config), "--out", str(run), "--ray"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # generous: on a saturated machine Ray workers (nice 15) start slowly
        while not (run / "checkpoints" / "step-00000001" / "state.json").exists():
            if proc.poll() is not None:
                pytest.fail(f"train --ray exited {proc.returncode} early: {proc.communicate()[1][-3000:]}")
            assert time.monotonic() < deadline, "no step checkpoint within 600 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGSTOP)  # Ray is up (a task ran): list its processes and sockets
        try:
            processes = process_tree(proc.pid)
            sockets = listening_sockets(processes)
            commands = [Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0") for p in alive(processes)]
        finally:
            proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]

    # 6: every listener on loopback, and the node registered under 127.0.0.1
    assert any("gcs_server" in c for *_, c in sockets) and any("raylet" in c for *_, c in sockets), sockets
    exposed = [s for s in sockets if not ipaddress.ip_address(s[1]).is_loopback]
    assert not exposed, f"listening on a non-loopback address: {exposed}"
    node_ips = {a.split(b"=", 1)[1] for c in commands for a in c if a.startswith((b"--node-ip-address=", b"--node_ip_address="))}
    assert node_ips == {b"127.0.0.1"}, node_ips

    # 7: no process of the run outlives it (agents included); bounded wait for them to exit
    deadline = time.monotonic() + 60
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(processes), f"Ray processes of the run still running: {alive(processes)}"

    # the session folder Ray keeps for its logs went with the run (exit 0)
    sessions = {a.split(b"=", 1)[1].decode() for c in commands for a in c if a.startswith(b"--session-name=")}
    assert len(sessions) == 1, sessions
    assert not (ray_tmp / sessions.pop()).exists()
