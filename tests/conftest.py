"""Shared test fixtures."""

from __future__ import annotations

import pytest

from metarec.data.synthetic import generate_domains

TINY_NAMES = ("src-a", "src-b", "target")


@pytest.fixture(scope="session", autouse=True)
def tune_secret(tmp_path_factory):
    """The tests' own `metarec tune` sealing secret (never the user's ~/.config/metarec/tune-secret)."""
    import os

    SECRET_ENV = "METAREC_TUNE_SECRET_FILE"  # tune.seal.SECRET_ENV (imported lazily: it imports Ray Tune)
    saved = os.environ.get(SECRET_ENV)
    os.environ[SECRET_ENV] = str(tmp_path_factory.mktemp("tune-secret") / "tune-secret")
    yield os.environ[SECRET_ENV]
    if saved is None:
        os.environ.pop(SECRET_ENV, None)
    else:
        os.environ[SECRET_ENV] = saved


@pytest.fixture
def tiny_domains(tmp_path) -> str:
    """Root dir (str) of 3 small prepared synthetic domains: 'src-a', 'src-b' (sources), 'target'."""
    return make_tiny_domains(tmp_path / "prepared")


@pytest.fixture(scope="module")
def tiny_domains_module(tmp_path_factory) -> str:
    """`tiny_domains`, once per test module."""
    return make_tiny_domains(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Torch on one thread in every test: tiny tensors run fastest so (above all on a busy
    machine), like each 1-CPU Ray worker; the bit-identical digests are defined on one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tiny_domains(path) -> str:
    return generate_domains(
        path,
        names=TINY_NAMES,
        n_users={"src-a": 120, "src-b": 80, "target": 40},
        n_items={"src-a": 60, "src-b": 48, "target": 32},
        seq_len={"src-a": 12, "src-b": 12, "target": 6},
        n_concepts=8,
        seed=0,
    )


@pytest.fixture
def moto_s3(monkeypatch):
    """A moto S3 server on 127.0.0.1 (random port) with dummy credentials; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def no_matplotlib():
    """The whole `matplotlib` package unimportable for the test (see tests/no_matplotlib.py)."""
    import sys

    import no_matplotlib as blocker

    saved = dict(sys.modules)
    finder = blocker.block()
    try:
        yield
    finally:
        blocker.unblock(finder, saved)


# Ray Train helpers a private test instance does without (fewer processes to start on a small CI box)
RAY_TRAIN_TEST_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",
}


@pytest.fixture(scope="module")
def private_ray(tmp_path_factory):
    """A private local Ray instance (loopback, token auth on, HOME in a temp dir) for one
    test module, started by `connect(None)` and shut down after the module."""
    import ray

    from metarec.ray.session import connect

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
            mp.delenv(var, raising=False)
        for var, value in RAY_TRAIN_TEST_ENV.items():
            mp.setenv(var, value)
        ray.shutdown()
        connect(None)
        try:
            yield home
        finally:
            ray.shutdown()
            from metarec.ray.sessions import forget

            forget()  # this process's record of the instance it shut down (what the CLI does)
    from metarec.ray.private import reset_token_cache

    reset_token_cache()  # forget the token mode of this module's instance
