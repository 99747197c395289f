"""The Ray runner: same update as the local runner, faults change no result (docs/design.md §6).

One private Ray instance (2 CPUs, token auth on, temp HOME) serves the whole module.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import ray
import torch

from metarec.config import config_from_dict
from metarec.errors import DataError, NonFiniteError
from metarec.ray.driver import FAIL_TASK_ONCE_ENV, RayRunner, WorkerFailedError
from metarec.ray.session import enable_local_token_auth, worker_config
from metarec.train import Trainer

ITERATIONS = 3


@pytest.fixture(scope="module")
def ray_home(private_ray):
    """A private local Ray instance started by `connect(None)`, with HOME in a temp dir (conftest)."""
    return private_ray


@pytest.fixture(scope="module")
def root(tiny_domains_module) -> str:
    return tiny_domains_module


def tiny_config(root: str, **ray_options):
    return config_from_dict({
        "seed": 3,
        "data": {"root": root, "target": "target", "sources": ["src-a", "src-b"], "max_len": 6},
        "model": {"hidden": 16, "blocks": 1},
        "train": {"batch_size": 8, "device": "cpu", "progress": False},
        "vq": {"heads": 2},
        "meta": {"tasks_per_iter": 3},  # more tasks than workers: they queue
        "ray": {"num_workers": 2, **ray_options},
    })


def meta_train(cfg, runner_factory=None, before_iteration=None) -> tuple[dict[str, torch.Tensor], Trainer]:
    """ITERATIONS outer steps of the real Trainer; returns the parameters and the trainer."""
    trainer = Trainer.from_config(cfg, "unused", runner_factory)
    try:
        for it in range(ITERATIONS):
            if before_iteration is not None:
                before_iteration(it, trainer.runner)
            trainer.step(it)
    finally:
        trainer.runner.close()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, trainer


def ray_factory(problem):
    return RayRunner(problem.cfg)


def assert_same_params(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def reference(root) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(initial, after ITERATIONS) parameters with the local runner."""
    cfg = tiny_config(root)
    initial = {n: p.detach().clone() for n, p in Trainer.from_config(cfg, "unused").model.named_parameters()}
    return initial, meta_train(cfg)[0]


@pytest.mark.ray
def test_local_instance_keeps_token_auth_on_without_touching_home(ray_home):
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert len(os.environ["RAY_AUTH_TOKEN"]) == 64
    assert is_token_auth_enabled()
    assert not (Path(ray_home) / ".ray").exists()


def test_disabled_auth_mode_is_refused_for_local_ray(monkeypatch):
    from metarec.errors import ConfigError

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="RAY_AUTH_MODE='disabled': metarec does not start a local Ray instance without token"):
        enable_local_token_auth()
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN" not in os.environ


@pytest.mark.ray
def test_ray_runner_matches_local_runner(ray_home, root, reference):
    initial, want = reference
    got, trainer = meta_train(tiny_config(root), ray_factory)
    assert_same_params(got, want)
    assert any(not torch.equal(want[n], initial[n]) for n in want)  # the comparison is not vacuous
    runner = trainer.runner
    assert sorted(runner.last_assignment) == [0, 1, 2] and set(runner.last_assignment.values()) == {0, 1}
    theta_bytes = sum(t.numel() * t.element_size() for t in want.values())
    assert runner.bytes_last_iteration > theta_bytes
    assert runner.worker_replacements == 0


@pytest.mark.ray
@pytest.mark.slow
def test_injected_worker_deaths_change_no_result(ray_home, root, reference, monkeypatch):
    monkeypatch.setenv(FAIL_TASK_ONCE_ENV, "1:1")
    got, trainer = meta_train(tiny_config(root), ray_factory)
    assert trainer.runner.worker_replacements == 1
    assert_same_params(got, reference[1])


@pytest.mark.ray
@pytest.mark.slow
def test_killed_workers_change_no_result(ray_home, root, reference, monkeypatch):
    """ray.kill of a live worker while tasks are in flight (iteration 0) and between iterations (before 2)."""
    real_wait = ray.wait
    killed = []

    def before_iteration(it, runner):
        if it == 0:
            def wait_and_kill(*args, **kwargs):  # first wait of iteration 0: both workers are busy
                if not killed:
                    killed.append(runner.workers[1])
                    ray.kill(runner.workers[1])
                return real_wait(*args, **kwargs)

            monkeypatch.setattr(ray, "wait", wait_and_kill)
        if it == 2:
            monkeypatch.setattr(ray, "wait", real_wait)
            ray.kill(runner.workers[0])

    got, trainer = meta_train(tiny_config(root), ray_factory, before_iteration)
    assert killed and trainer.runner.worker_replacements == 2
    assert_same_params(got, reference[1])


@pytest.mark.ray
def test_a_task_that_keeps_failing_stops_the_run(ray_home, root, reference, monkeypatch):
    monkeypatch.setattr(RayRunner, "_should_die", lambda self, spec: spec.index == 0)
    runner = RayRunner(tiny_config(root, max_task_retries=1, num_workers=1))
    specs = Trainer.from_config(tiny_config(root), "unused").sampler.sample(0)
    try:
        with pytest.raises(WorkerFailedError, match=r"iteration 0: task 0 \(source '.+'\) failed 2 times \(ray.max_task_retries = 1\)"):
            runner.run_tasks(reference[0], specs)
    finally:
        runner.close()
    assert runner.worker_replacements == 1  # after the first death; the second one stops the run (no third attempt)


@pytest.mark.ray
def test_a_task_past_its_timeout_counts_as_failed(ray_home, root, reference):
    runner = RayRunner(tiny_config(root, max_task_retries=0, num_workers=1), task_timeout_s=0.01)
    specs = Trainer.from_config(tiny_config(root), "unused").sampler.sample(0)
    try:
        with pytest.raises(WorkerFailedError, match=r"task 0 .* failed 1 times .*no result within task_timeout_s=0.01 s"):
            runner.run_tasks(reference[0], specs)
    finally:
        runner.close()


@pytest.mark.ray
def test_task_errors_surface_as_the_original_error(ray_home, root, reference):
    runner = RayRunner(tiny_config(root, num_workers=1))
    specs = Trainer.from_config(tiny_config(root), "unused").sampler.sample(0)
    poisoned = {n: torch.full_like(t, float("nan")) if n.startswith("encoder.") else t for n, t in reference[0].items()}
    try:
        with pytest.raises(NonFiniteError, match="iteration 0"):
            runner.run_tasks(poisoned, specs)
        assert runner.worker_replacements == 0  # a task error is not a lost worker: no retry
    finally:
        runner.close()


@pytest.mark.ray
def test_workers_that_cannot_load_their_data_fail_with_the_data_error(ray_home, tmp_path):
    cfg = tiny_config(str(tmp_path / "no-such-root"), num_workers=1)
    with pytest.raises(DataError, match="no-such-root"):
        RayRunner(cfg, start_timeout_s=120)


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1:6379", True), ("127.1.2.3:6379", True), ("localhost:6379", True), ("[::1]:6379", True),
    ("10.0.0.5:6379", False), ("head.example:6379", False), ("auto", False), ("ray://127.0.0.1:10001", False),
])
def test_loopback_cluster_addresses_are_recognised(address, loopback):
    """connect() joins these in Ray's single-machine mode (Ray would rewrite 127.0.0.1 to the outward IP)."""
    from metarec.ray.session import is_loopback_address

    assert is_loopback_address(address) is loopback


def test_shutdown_deletes_a_folder_workers_wrote_to_after_the_run_removed_it(tmp_path, monkeypatch):
    """Ray Train's scratch: the run removes it as it ends, but a worker still running (the
    driver got SIGTERM) may write there again; `shutdown` deletes it once Ray is down."""
    from metarec.ray import raylet_watch, sessions
    from metarec.ray import session as ray_session
    from metarec.ray.session import remove_at_shutdown, shutdown

    # Ray itself is not stopped here: other tests of this process may share an instance
    for module, name in [(ray_session.ray, "shutdown"), (raylet_watch, "stop"), (sessions, "forget")]:
        monkeypatch.setattr(module, name, lambda: None)
    monkeypatch.setattr(sessions, "own_session", lambda: None)
    scratch = tmp_path / ".ray-train-scratch.tmp-0"
    remove_at_shutdown(str(scratch))
    (scratch / "rank-1").mkdir(parents=True)  # written after the run's own removal
    (scratch / "rank-1" / "state.json").write_text("{}")
    shutdown(keep_logs=True)
    assert not scratch.exists() and tmp_path.exists()


def test_worker_config_makes_a_local_data_root_absolute(root, monkeypatch):
    monkeypatch.chdir(Path(root).parent)
    cfg = tiny_config(Path(root).name)
    assert worker_config(cfg)["data"]["root"] == str(Path(root).resolve())
    assert worker_config(tiny_config("s3://bucket/prepared"))["data"]["root"] == "s3://bucket/prepared"


@pytest.mark.ray
@pytest.mark.slow
def test_a_replaced_worker_is_logged_and_counted_in_history(ray_home, root, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv(FAIL_TASK_ONCE_ENV, "1:1")
    cfg = tiny_config(root)
    cfg.train.max_steps, cfg.train.eval_every = ITERATIONS, ITERATIONS
    metrics = Trainer.from_config(cfg, str(tmp_path / "run"), ray_factory).fit()
    err = capfd.readouterr().err
    replaced = [line for line in err.splitlines() if line.startswith("replaced Ray worker")]
    assert len(replaced) == 1, err[-2000:]
    assert re.match(r"replaced Ray worker in slot [01] \(iteration 1, task 1, source '.+'\): \w+", replaced[0])
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [r.get("worker_replacements", 0) for r in history] == [0, 1, 0]
    assert metrics["worker_replacements"] == 1


def _cli_config(tmp_path, root: str, **ray_options) -> str:
    """A tiny MetaRec config file (2 steps) whose workers are sized so that exactly 2 fit
    on this Ray instance, whatever its CPU count."""
    import yaml

    cpus = ray.cluster_resources()["CPU"] / 2
    raw = tiny_config(root).to_dict()
    raw["train"].update(max_steps=2, eval_every=1)
    raw["ray"].update(cpus_per_worker=cpus, **ray_options)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.ray
def test_cli_train_ray_local_lowers_num_workers_to_what_fits(ray_home, root, tmp_path):
    from click.testing import CliRunner

    from metarec.cli import cli

    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", _cli_config(tmp_path, root, num_workers=3), "--ray", "--out", str(out)])
    assert result.exit_code == 0, result.output
    notices = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notices) == 1 and "using ray.num_workers=2 instead of 3" in notices[0], result.stderr
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["ray"]["num_workers"] == 2  # what the run used


@pytest.mark.ray
def test_cli_train_ray_cluster_too_small_fails_at_once(ray_home, root, tmp_path):
    """--ray-address: the request is the user's; a cluster that cannot place it is an error
    before any data is loaded (the runner would otherwise wait 600 s)."""
    from click.testing import CliRunner

    from metarec.cli import cli

    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", _cli_config(tmp_path, root, num_workers=3), "--ray-address", "auto", "--out", str(out)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ray.num_workers=3 x ray.cpus_per_worker=")
    assert result.stderr.rstrip().endswith("--set ray.num_workers=2 would fit")
    assert not out.exists()  # nothing was started
