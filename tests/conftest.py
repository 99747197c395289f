"""Shared test fixtures."""

from __future__ import annotations

import pytest

from metarec.data.synthetic import generate_domains

TINY_NAMES = ("src-a", "src-b", "target")


@pytest.fixture
def tiny_domains(tmp_path) -> str:
    """Root dir (str) of 3 small prepared synthetic domains: 'src-a', 'src-b' (sources), 'target'."""
    return generate_domains(
        tmp_path / "prepared",
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
