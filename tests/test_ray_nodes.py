"""A lost node: the runners on a local multi-node Ray cluster.

The cluster (`ray.cluster_utils.Cluster`) is a head and worker nodes, each its own raylet
on this machine, every server on 127.0.0.1, token authentication on (as
`metarec.ray.session` sets it up for a local instance), Ray's temp dir and HOME in one
fresh folder. The head has no CPUs, so the runners' workers go to the one node that has
some; mid-run that node is killed (SIGKILL of its raylet, agents and workers) and a fresh
node joins, as an autoscaler would bring one. The run must end with the parameters of an
unfaulted run: the driver runner re-runs the lost tasks on new workers, the collective
runner's group restarts from the last checkpoint. Afterwards no process of the cluster is
left and its folder is gone. Linux only (reads /proc).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from conftest import RAY_TRAIN_TEST_ENV
from metarec.ray.driver import RayRunner
from metarec.ray.session import LOOPBACK, connect, enable_local_token_auth
from test_collective import ITERATIONS
from test_collective import tiny_config as collective_config
from test_ray_local import alive, listening_sockets, process_tree

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")]

HANG_GUARD_S = 600  # only catches a hang; the tests wait for states, never for a time


def tiny_config(root: str, **ray_options):
    """tests/test_collective.py's run (3 iterations, 3 tasks each) on 2 workers: the tasks queue."""
    return collective_config(root, num_workers=2, **ray_options)


@pytest.fixture(scope="module")
def root(tiny_domains_module) -> str:
    return tiny_domains_module


def assert_same_params(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------ the cluster


class LocalCluster:
    """A `ray.cluster_utils.Cluster` on 127.0.0.1 whose head has no CPUs; remembers every
    process it has seen (pid and start time), what they listen on and the auth mode its
    servers run with."""

    def __init__(self, folder: str):
        from ray.cluster_utils import Cluster

        self.folder = folder
        self.seen: dict[int, str] = {}
        self.sockets: list[tuple[int, str, int, str]] = []
        self.auth: dict[str, set[str | None]] = {"gcs_server": set(), "raylet": set()}
        self.left: dict[int, str] = {}  # processes still running after the shutdown (bounded wait)
        self.cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args={
            "num_cpus": 0, "node_ip_address": LOOPBACK, "include_dashboard": False})

    def add_node(self, cpus: float):
        node = self.cluster.add_node(num_cpus=cpus, node_ip_address=LOOPBACK)
        self.note()
        return node

    def kill(self, node) -> None:
        """Lose `node`: SIGKILL its raylet, agents and workers."""
        self.note()
        self.cluster.remove_node(node, allow_graceful=False)

    def connect(self) -> None:
        connect(self.cluster.address)  # the way `metarec train --ray-address 127.0.0.1:PORT` joins
        self.note()

    def note(self) -> None:
        """Remember the processes of the cluster (this process's descendants) and their listeners."""
        tree = process_tree(os.getpid())
        tree.pop(os.getpid(), None)
        self.seen.update(tree)
        self.sockets += listening_sockets(tree)
        for pid in tree:
            with contextlib.suppress(OSError, IndexError):
                server = os.path.basename(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode())
                if server in self.auth:
                    env = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)
                    self.auth[server].add(env.get(b"RAY_AUTH_MODE", b"").decode() or None)

    def shutdown(self) -> None:
        self.note()
        ray.shutdown()
        self.cluster.shutdown()
        deadline = time.monotonic() + 60
        while alive(self.seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.left = alive(self.seen)
        for pid in self.left:  # the test fails on them; do not leave them to the machine
            with contextlib.suppress(OSError):
                os.kill(pid, 9)


@contextlib.contextmanager
def local_cluster(env: dict[str, str] | None = None):
    """A LocalCluster in a fresh folder (Ray's temp dir and HOME), shut down and removed on
    exit; `env`: more environment variables for the driver and the cluster's processes."""
    from metarec.ray.private import reset_token_cache

    folder = tempfile.mkdtemp(prefix="metarec-nodes-")  # short: Ray's socket paths must stay under 108 bytes
    cluster = None
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HOME", folder)
            mp.setenv("RAY_TMPDIR", folder)  # sessions and the address file Ray writes for `auto`
            for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
                mp.delenv(var, raising=False)
            for var, value in {**RAY_TRAIN_TEST_ENV, **(env or {})}.items():
                mp.setenv(var, value)
            enable_local_token_auth()  # the cluster's processes inherit RAY_AUTH_MODE=token and the token
            ray.shutdown()
            try:
                cluster = LocalCluster(folder)
                yield cluster
            finally:
                if cluster is not None:
                    cluster.shutdown()
                else:
                    ray.shutdown()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        reset_token_cache()


def assert_loopback_token_cluster_left_nothing(cluster: LocalCluster) -> None:
    """Every listener of the cluster on loopback; its servers ran with token auth; after the
    shutdown no process of it runs and its folder is gone."""
    assert cluster.auth == {"gcs_server": {"token"}, "raylet": {"token"}}
    commands = {c.split()[0] for *_, c in cluster.sockets if c.strip()}  # (a process that was exiting: no command)
    assert {"gcs_server", "raylet"} <= commands, cluster.sockets
    exposed = [s for s in cluster.sockets if not ipaddress.ip_address(s[1]).is_loopback]
    assert not exposed, f"listening on a non-loopback address: {exposed}"
    assert not cluster.left, f"processes of the cluster still running after its shutdown: {cluster.left}"
    assert not Path(cluster.folder).exists()


# ------------------------------------------------------------------ the driver runner


def test_the_driver_runner_re_runs_the_tasks_of_a_lost_node(root, monkeypatch, capfd):
    from metarec.train import Trainer

    cfg = tiny_config(root)
    trainer = Trainer.from_config(cfg, "unused")
    for it in range(ITERATIONS):
        trainer.step(it)
    want = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    # every task result in the object store of the node that ran it (not inlined in the reply):
    # one that finished before its node was lost is lost with it
    with local_cluster({"RAY_max_direct_call_object_size": "0"}) as cluster:
        lost = cluster.add_node(cpus=1)  # the only CPUs: both workers (0.5 CPU each) are placed there
        cluster.connect()
        trainer = Trainer.from_config(cfg, "unused", lambda problem: RayRunner(problem.cfg, start_timeout_s=HANG_GUARD_S))
        real_wait, killed = ray.wait, []

        def wait_then_lose_the_node(*args, **kwargs):  # iteration 1: once a task has finished on that node
            done = real_wait(*args, **kwargs)
            if not killed:
                killed.append(True)
                cluster.kill(lost)
                cluster.add_node(cpus=1)
            return done

        try:
            trainer.step(0)
            monkeypatch.setattr(ray, "wait", wait_then_lose_the_node)
            trainer.step(1)
            monkeypatch.setattr(ray, "wait", real_wait)
            trainer.step(2)
        finally:
            monkeypatch.setattr(ray, "wait", real_wait)
            trainer.runner.close()
        got = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        replacements = trainer.runner.worker_replacements
    assert killed and replacements == 2  # both workers were on the lost node
    err = capfd.readouterr().err
    assert sum(line.startswith("replaced Ray worker in slot") and "(iteration 1, task" in line
               for line in err.splitlines()) == 2, err[-3000:]
    assert_same_params(got, want)
    assert_loopback_token_cluster_left_nothing(cluster)


# ------------------------------------------------------------------ the collective runner


def test_the_collective_runner_restarts_from_the_last_checkpoint_when_its_node_is_lost(root, tmp_path, monkeypatch):
    import json

    from metarec.checkpoint import load_checkpoint
    from metarec.ray.ray_train import HOLD_ENV, fit_with_ray_train, hold_marker
    from metarec.train import train

    cfg = tiny_config(root, mode="collective")
    train(cfg, str(tmp_path / "unfaulted"))  # the local runner: the same update (tests/test_collective.py)
    want = load_checkpoint(str(tmp_path / "unfaulted" / "checkpoints" / f"step-{ITERATIONS:08d}")).params

    out = str(tmp_path / "run")
    marker = hold_marker(out, 2, 1)
    monkeypatch.setenv(HOLD_ENV, "2:1")  # worker 1 waits in iteration 2, the group with it, until its node is lost
    with local_cluster() as cluster:
        lost = cluster.add_node(cpus=1)  # the only CPUs: the group (2 x 0.5 CPU) is placed there
        cluster.connect()
        failure: list[BaseException] = []

        def lose_the_node_once_held() -> None:
            try:
                deadline = time.monotonic() + HANG_GUARD_S
                while not os.path.exists(marker) and time.monotonic() < deadline:
                    time.sleep(0.1)
                cluster.kill(lost)
                cluster.add_node(cpus=1)
            except BaseException as err:  # noqa: BLE001 - reported by the test
                failure.append(err)

        chaos = threading.Thread(target=lose_the_node_once_held, daemon=True)
        chaos.start()
        metrics = fit_with_ray_train(cfg, out, local=True)
        chaos.join(timeout=HANG_GUARD_S)
    assert not failure, failure
    assert os.path.exists(marker)
    rows = [json.loads(line) for line in Path(out, "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and metrics["steps"] == ITERATIONS
    # the new group (on the new node) started from a checkpoint Ray Train had registered (step 1 or 2)
    replaced = [r.get("worker_replacements", 0) for r in rows]
    assert replaced in ([0, 2, 0], [0, 0, 2]) and metrics["worker_replacements"] == 2
    got = load_checkpoint(f"{out}/checkpoints/step-{ITERATIONS:08d}").params
    assert_same_params(got, want)
    assert_loopback_token_cluster_left_nothing(cluster)
