"""`file://` run directories and data roots are local paths: the same lock and atomic writes."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from metarec import fs
from metarec.errors import ConfigError
from metarec.run_dir import RunDir
from test_run_dir import metarec_cli, wait_for, write_config


def test_file_uris_are_local_paths(tmp_path):
    assert fs.local_path(f"file://{tmp_path}/run") == f"{tmp_path}/run"
    assert fs.local_path("file://localhost/a%20b") == "/a b"
    assert not fs.is_uri(f"file://{tmp_path}") and fs.is_uri("s3://bucket/x")
    assert RunDir(f"file://{tmp_path}/run/").uri == f"{tmp_path}/run"
    assert fs.join(f"file://{tmp_path}", "a") == f"{tmp_path}/a"
    fs.atomic_write_bytes(f"file://{tmp_path}/x.txt", b"x")
    assert (tmp_path / "x.txt").read_bytes() == b"x" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]
    with pytest.raises(ConfigError, match="must name a local path"):
        fs.local_path("file://otherhost/x")


def test_a_second_train_on_the_same_file_uri_refuses_at_once(tiny_domains, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_domains, max_steps=100000)
    run = tmp_path / "run"
    first = metarec_cli("train", str(config), "--out", f"file://{run}")
    try:
        lock = run / ".lock"
        wait_for(lambda: lock.exists() and lock.read_text().strip() == str(first.pid), "holding the lock", proc=first)
        first.send_signal(signal.SIGSTOP)  # holds the lock, whatever it is doing
        second = metarec_cli("train", str(config), "--out", f"file://{run}")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert f"run directory is in use by another metarec process (pid {first.pid})" in err and "Traceback" not in err
        also_plain = metarec_cli("train", str(config), "--out", str(run))  # the same directory, spelled as a path
        _, err = also_plain.communicate(timeout=120)
        assert also_plain.returncode == 2 and "in use by another metarec process" in err, err
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    assert not [p for p in Path(run).iterdir() if p.name.startswith(".") and p.name != ".lock"]
