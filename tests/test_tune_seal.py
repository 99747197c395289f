"""`metarec tune --resume` trusts only a store sealed by this user's own sweeps (`tune.seal`):
a tampered or foreign store is refused with one line before anything in it is unpickled."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metarec.errors import ConfigError
from tune import seal
from tune.sweep import run_sweep

METAREC = [sys.executable, "-m", "metarec.cli"]
HANG_GUARD_S = 900


class _Marker:
    """Unpickling this creates the marker file: a stand-in for code run from a crafted pickle."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Marker(str(marker)))


def _space(tmp: Path, root: str) -> str:
    base = {
        "name": "tiny",
        "data": {"root": root, "target": "target", "sources": ["src-a", "src-b"], "max_len": 8},
        "model": {"hidden": 16, "blocks": 1},
        "train": {"batch_size": 16, "max_steps": 10, "eval_every": 5, "patience": 100, "device": "cpu", "progress": False},
        "meta": {"tasks_per_iter": 2},
    }
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    space = {"name": "sealed", "base_config": "base.yaml", "num_samples": 1, "max_concurrent_trials": 1,
             "scheduler": {"grace_period": 1, "reduction_factor": 2}, "params": {"rescale.tau": {"loguniform": [0.05, 5.0]}}}
    (tmp / "space.yaml").write_text(yaml.safe_dump(space))
    return str(tmp / "space.yaml")


def _fake_store(experiment: Path) -> None:
    """The files a Tune restore reads, as a sweep leaves them (contents are placeholders)."""
    (experiment / "t0" / "run" / "checkpoints").mkdir(parents=True)
    (experiment / "tuner.pkl").write_bytes(b"tuner state")
    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')
    (experiment / "t0" / "params.pkl").write_bytes(b"params")
    (experiment / "t0" / "result.json").write_text("{}\n")
    (experiment / "t0" / "run" / "history.jsonl").write_text("{}\n")


def test_seal_accepts_what_it_sealed_and_refuses_changes(tmp_path):
    experiment = tmp_path / "s"
    _fake_store(experiment)
    seal.write_seal(str(experiment))
    seal.verify(str(experiment))
    assert (Path(os.environ[seal.SECRET_ENV]).stat().st_mode & 0o777) == 0o600

    # Files a restore does not unpickle may change (Tune appends results, metarec trains the run).
    (experiment / "t0" / "result.json").write_text('{"step": 5}\n')
    (experiment / "t0" / "run" / "history.jsonl").write_text('{"step": 5}\n')
    seal.verify(str(experiment))

    # A newer sealed version is accepted, and so is the previous one (a kill may land before the store catches up).
    state = experiment / "experiment_state-2026-01-01_00-00-00.json"
    state.write_text('{"trial_data": [1]}')
    seal.write_seal(str(experiment))
    seal.verify(str(experiment))
    state.write_text('{"trial_data": []}')
    seal.verify(str(experiment))

    cases = {
        "tuner.pkl": lambda: (experiment / "tuner.pkl").write_bytes(b"tuner statE"),
        "experiment_state-2026-01-01_00-00-00.json": lambda: state.write_text('{"trial_data": [2]}'),
        "experiment_state-2027-01-01_00-00-00.json": lambda: (experiment / "experiment_state-2027-01-01_00-00-00.json").write_text("{}"),
        "t0/error.pkl": lambda: (experiment / "t0" / "error.pkl").write_bytes(b"x"),
        "t0/checkpoint_000000/_dict_checkpoint.pkl": lambda: (experiment / "t0" / "checkpoint_000000").mkdir() or (experiment / "t0" / "checkpoint_000000" / "_dict_checkpoint.pkl").write_bytes(b"x"),
    }
    for name, tamper in cases.items():
        snapshot = {p: p.read_bytes() for p in experiment.rglob("*") if p.is_file()}
        tamper()
        with pytest.raises(ConfigError, match=f"refusing to resume: {name} is not a version this user's sweep wrote"):
            seal.verify(str(experiment))
        for p in experiment.rglob("*"):
            if p.is_file() and p not in snapshot:
                p.unlink()
        for p, data in snapshot.items():
            p.write_bytes(data)
        seal.verify(str(experiment))


def test_seal_of_another_secret_or_none_is_refused(tmp_path, monkeypatch):
    experiment = tmp_path / "s"
    _fake_store(experiment)
    with pytest.raises(ConfigError, match=r"\.metarec-seal\.json is missing or not signed"):
        seal.verify(str(experiment))
    seal.write_seal(str(experiment))
    monkeypatch.setenv(seal.SECRET_ENV, str(tmp_path / "other-secret"))
    with pytest.raises(ConfigError, match="no tune secret at"):
        seal.verify(str(experiment))
    seal.load_secret(create=True)
    with pytest.raises(ConfigError, match="not signed with this user's tune secret"):
        seal.verify(str(experiment))
    # A seal edited to vouch for other contents fails its MAC.
    monkeypatch.undo()
    text = json.loads((experiment / seal.SEAL_FILE).read_text())
    text["files"]["tuner.pkl"] = ["0" * 64]
    (experiment / seal.SEAL_FILE).write_text(json.dumps(text))
    with pytest.raises(ConfigError, match="not signed with this user's tune secret"):
        seal.verify(str(experiment))


def test_resume_of_an_unsealed_store_unpickles_nothing(tmp_path, tiny_domains):
    """A crafted tuner.pkl in a store this user's sweep did not write: refused, nothing run."""
    space = _space(tmp_path, tiny_domains)
    experiment = tmp_path / "store" / "sealed"
    experiment.mkdir(parents=True)
    marker = tmp_path / "marker"
    (experiment / "tuner.pkl").write_bytes(_evil_pickle(marker))
    res = subprocess.run([*METAREC, "tune", space, "--storage-path", str(tmp_path / "store"), "--resume"], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "refusing to resume" in lines[0], res.stderr[-3000:]
    assert not marker.exists()
    with pytest.raises(ConfigError, match="refusing to resume"):
        run_sweep(space, storage_path=str(tmp_path / "store"), resume=True)
    assert not marker.exists()


@pytest.mark.ray
@pytest.mark.slow
def test_a_tampered_tuner_pkl_of_a_real_sweep_is_refused_and_the_intact_store_resumes(tmp_path, tiny_domains):
    space = _space(tmp_path, tiny_domains)
    store = tmp_path / "store"
    cmd = [*METAREC, "tune", space, "--storage-path", str(store)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    experiment = store / "sealed"
    assert (experiment / seal.SEAL_FILE).exists()
    tuner_pkl = experiment / "tuner.pkl"
    original = tuner_pkl.read_bytes()
    marker = tmp_path / "marker"
    tuner_pkl.write_bytes(_evil_pickle(marker))
    res = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert res.returncode == 2 and not marker.exists(), res.stderr[-3000:]
    assert res.stderr.strip().splitlines() == [f"error: {experiment}: refusing to resume: tuner.pkl is not a version this user's sweep wrote (altered or added since; a resume would unpickle it)"]
    tuner_pkl.write_bytes(original)
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert json.loads((experiment / "results.json").read_text())[0]["status"] == "completed"
